#!/usr/bin/env bash
# build_test.sh: build the image, then run the checks inside it (what `make build-test` runs):
#   the entrypoint (startup check + exit code handover), make test-env, --help of every subcommand,
#   verify-runtime (informational without a GPU), and the tiny GPT-OSS demo (make smoke).
# Settings (environment): IMAGE (gptoss-compressor:cu128), BASE_IMAGE (the Dockerfile's default),
#   CUDA_ARCH (8.6), INSTALL_QQQ (true), GPUS (auto: all when docker has the nvidia runtime; none; 0,1).
# Exit codes:
#   0 every check passed          1 a check inside the image failed     2 docker build failed
#   3 no docker client, or no Docker daemon answers
#   4 the base image is not here and cannot be pulled (registry unreachable, or no such tag)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")" || exit 2

IMAGE=${IMAGE:-gptoss-compressor:cu128}
CUDA_ARCH=${CUDA_ARCH:-8.6}
INSTALL_QQQ=${INSTALL_QQQ:-true}
BASE_IMAGE=${BASE_IMAGE:-$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)}
GPUS=${GPUS:-auto}

say() { printf '[build-test] %s\n' "$*"; }

if ! command -v docker >/dev/null 2>&1; then
    say "no docker client on PATH: install Docker (Debian: apt-get install docker.io), then run again"
    exit 3
fi
if ! docker info >/dev/null 2>&1; then
    say "no Docker daemon answers (docker info failed): start it (dockerd / systemctl start docker) or fix DOCKER_HOST / your docker group"
    exit 3
fi
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE: present"
else
    say "base image $BASE_IMAGE: not here, pulling"
    if ! docker pull "$BASE_IMAGE"; then
        say "base image $BASE_IMAGE is not here and cannot be pulled (registry unreachable or no such tag): docker load it, or BASE_IMAGE=<a local CUDA devel image with torch 2.10-2.14>"
        exit 4
    fi
fi

say "building $IMAGE (BASE_IMAGE=$BASE_IMAGE CUDA_ARCH=$CUDA_ARCH INSTALL_QQQ=$INSTALL_QQQ)"
if ! docker build -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "CUDA_ARCH=$CUDA_ARCH" \
    --build-arg "INSTALL_QQQ=$INSTALL_QQQ" .; then
    say "docker build failed: see the step above"
    exit 2
fi

gpu=()
case $GPUS in
    auto)
        if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then gpu=(--gpus all); fi
        ;;
    none) ;;
    all) gpu=(--gpus all) ;;
    *) gpu=(--gpus "\"device=$GPUS\"") ;;
esac
say "GPUs: ${gpu[*]:-none (verify-runtime is informational)}"

passed=0
failed=0
# check NAME [--informational] -- DOCKER_RUN_ARGS... : one `docker run` of the image, counted.
check() {
    local name=$1 informational=false rc
    shift
    if [ "$1" = --informational ]; then
        informational=true
        shift
    fi
    say "check: $name"
    docker run --rm "${gpu[@]}" "$@"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        say "ok: $name"
    elif [ "$informational" = true ]; then
        say "info: $name exited $rc (no GPU given: not counted)"
    else
        failed=$((failed + 1))
        say "FAILED: $name (exit $rc)"
    fi
}

# The entrypoint runs a startup check, then hands over the command and its exit code (7).
check "entrypoint runs test-env, then the command" -e AUTO_VERIFY=false "$IMAGE" true
docker run --rm -e SKIP_STARTUP_COMMANDS=true "$IMAGE" sh -c 'exit 7'
rc=$?
if [ "$rc" -eq 7 ]; then
    passed=$((passed + 1))
    say "ok: entrypoint hands over the exit code (7)"
else
    failed=$((failed + 1))
    say "FAILED: entrypoint exit code handover: expected 7, got $rc"
fi

quiet=(-e SKIP_STARTUP_COMMANDS=true "$IMAGE")
check "make test-env" "${quiet[@]}" make test-env
check "compress_gptoss.py --help" "${quiet[@]}" python compress_gptoss.py --help
for sub in dequantize quantize install-kernel verify-runtime; do
    check "$sub --help" "${quiet[@]}" python compress_gptoss.py "$sub" --help
done
if [ ${#gpu[@]} -gt 0 ]; then
    check "verify-runtime" "${quiet[@]}" python compress_gptoss.py verify-runtime
else
    check "verify-runtime" --informational "${quiet[@]}" python compress_gptoss.py verify-runtime
fi
check "tiny GPT-OSS demo (make smoke)" "${quiet[@]}" make smoke

say "$IMAGE: $passed passed, $failed failed"
[ "$failed" -eq 0 ] || exit 1
