"""docker-entrypoint.sh inside a real container, where PID 1, `docker run`'s exit code and `docker stop`
matter. Needs a Docker daemon (skipped without one, as in CI: Docker Hub is out of reach, so the base
image is made here from this machine's own bash, sh and coreutils, and `make`/`python` are stubs)."""
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = "gptoss-entrypoint-test:base"
IMAGE = "gptoss-entrypoint-test:latest"
BINARIES = ["bash", "sh", "env", "sleep", "cat", "basename", "touch"]

STUB = """#!/bin/sh
name=$(basename "$0")
echo "STUB $name $*" >&2
if [ "$name" = python ] && [ "$1" = -c ]; then exit 1; fi
case "$*" in
  *test-env*) exit "${STUB_RC_TEST_ENV:-0}" ;;
  *verify-runtime*) exit "${STUB_RC_VERIFY:-0}" ;;
esac
exit 0
"""


def docker(*args, timeout=120, check=False):
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def shared_libs(binary: str) -> set[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = set()
    for ln in out.splitlines():
        parts = ln.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.add(path)
    return libs


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if shutil.which("docker") is None or docker("info").returncode != 0:
        pytest.skip("no Docker daemon answers (docker info): start dockerd to run the in-container checks")
    tmp = tmp_path_factory.mktemp("img")
    rootfs = tmp / "rootfs.tar"
    with tarfile.open(rootfs, "w") as tar:
        files = set()
        for b in BINARIES:
            path = shutil.which(b)
            files |= {path, *shared_libs(path)}
        for f in sorted(files):
            real = str(Path(f).resolve())
            tar.add(real, arcname=f.lstrip("/"))
            for d in ("usr/bin/", "bin/"):  # both spellings: merged /usr or not
                name = d + Path(f).name
                if f in {shutil.which(b) for b in BINARIES} and name != f.lstrip("/"):
                    tar.add(real, arcname=name)
        for d in ("tmp", "usr/local/bin", "workspace/app"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
    r = subprocess.run(["docker", "import", str(rootfs), BASE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ctx = tmp / "ctx"
    ctx.mkdir()
    shutil.copy2(ROOT / "docker-entrypoint.sh", ctx)
    for name in ("make", "python"):
        (ctx / name).write_text(STUB)
        (ctx / name).chmod(0o755)
    (ctx / "Dockerfile").write_text(
        f"FROM {BASE}\nENV PATH=/usr/local/bin:/usr/bin:/bin\nWORKDIR /workspace/app\n"
        "COPY docker-entrypoint.sh make python /usr/local/bin/\n"
        'ENTRYPOINT ["docker-entrypoint.sh"]\nCMD ["bash"]\n')
    r = docker("build", "-q", "-t", IMAGE, str(ctx), timeout=300)
    assert r.returncode == 0, r.stderr
    yield IMAGE
    if not os.environ.get("KEEP_TEST_IMAGE"):
        docker("rmi", "-f", IMAGE, BASE)


def test_in_a_container_the_command_is_pid_1_and_its_exit_code_is_the_containers(image):
    r = docker("run", "--rm", image, "sh", "-c", "echo pid=$$; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout.strip() == "pid=1"
    stubs = [ln for ln in r.stderr.splitlines() if ln.startswith("STUB ")]
    assert stubs == ["STUB make -C /workspace/app --no-print-directory test-env",
                     "STUB python /workspace/app/compress_gptoss.py verify-runtime"]


def test_in_a_container_strict_startup_stops_with_the_checks_code(image):
    r = docker("run", "--rm", "-e", "STRICT_STARTUP=true", "-e", "STUB_RC_VERIFY=3", image, "touch", "/tmp/x")
    assert r.returncode == 3
    assert "verify-runtime failed (exit 3); STRICT_STARTUP=true" in r.stderr
    r = docker("run", "--rm", "-e", "STUB_RC_VERIFY=3", image, "sh", "-c", "exit 0")
    assert r.returncode == 0 and "verify-runtime FAILED (exit 3)" in r.stderr


def test_default_command_is_an_interactive_shell(image):
    r = subprocess.run(["docker", "run", "--rm", "-i", "-e", "SKIP_STARTUP_COMMANDS=true", image],
                       input="echo from-the-shell; exit 5\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 5 and r.stdout.strip() == "from-the-shell"


def test_docker_stop_reaches_the_command_with_init(image):
    """compose's `init: true` and make's `docker run --init`: SIGTERM ends the command at once."""
    name = f"gptoss-stop-{int(time.time() * 1000)}"
    r = docker("run", "-d", "--init", "--name", name, "-e", "SKIP_STARTUP_COMMANDS=true", image, "sleep", "300")
    assert r.returncode == 0, r.stderr
    try:
        time.sleep(1)
        t0 = time.time()
        assert docker("stop", "-t", "30", name).returncode == 0
        assert time.time() - t0 < 10
    finally:
        docker("rm", "-f", name)
