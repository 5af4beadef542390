#!/usr/bin/env bash
# docker-entrypoint.sh: the image's ENTRYPOINT. Runs the startup checks that the variables below ask
# for, then hands the container over to the user's command with `exec` (default: an interactive
# shell), so that the command is PID 1, gets the signals and its exit code is the container's.
#
#   variable               default  what it does
#   SKIP_STARTUP_COMMANDS  false    skip every check below
#   AUTO_TEST_ENV          true     make test-env            (python, torch/CUDA, GPUs, packages)
#   AUTO_INSTALL_KERNELS   false    compress_gptoss.py install-kernel --yes, only if QQQ is missing
#   AUTO_VERIFY            true     compress_gptoss.py verify-runtime
#   RUN_MICROBENCH         false    adds --bench --shapes gpt-oss to verify-runtime
#   STRICT_STARTUP         false    a failing check stops the container with its exit code;
#                                   otherwise it is reported and the user's command runs anyway
#   APP_DIR                /workspace/app   where compress_gptoss.py and the Makefile are
#   APP_PYTHON             python   the interpreter that runs compress_gptoss.py
#
# A value other than true/false (also 1/0, yes/no) is a mistake in the caller's settings: it is
# reported in one line and the container exits 64 before anything runs.
set -uo pipefail

APP_DIR=${APP_DIR:-/workspace/app}
APP_PYTHON=${APP_PYTHON:-python}

say() { printf '[entrypoint] %s\n' "$*" >&2; }

# flag NAME DEFAULT: prints true or false, or exits 64 on a value that is neither.
flag() {
    local value=${!1:-$2}
    case ${value,,} in
        true | 1 | yes) echo true ;;
        false | 0 | no | "") echo false ;;
        *)
            say "$1=$value is not true or false: fix the variable (docker run -e $1=true|false)"
            exit 64
            ;;
    esac
}

skip_all=$(flag SKIP_STARTUP_COMMANDS false) || exit 64
test_env=$(flag AUTO_TEST_ENV true) || exit 64
install_kernels=$(flag AUTO_INSTALL_KERNELS false) || exit 64
verify=$(flag AUTO_VERIFY true) || exit 64
microbench=$(flag RUN_MICROBENCH false) || exit 64
strict=$(flag STRICT_STARTUP false) || exit 64

if [ $# -eq 0 ]; then
    set -- bash
fi

failed=0
summary=()

# check NAME COMMAND...: runs one startup check and records how it went.
check() {
    local name=$1 rc
    shift
    say "startup: $name: $*"
    "$@"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        summary+=("$name ok")
        return 0
    fi
    summary+=("$name FAILED (exit $rc)")
    if [ "$strict" = true ]; then
        say "startup: $name failed (exit $rc); STRICT_STARTUP=true, so '$*' does not run"
        exit "$rc"
    fi
    say "startup: $name failed (exit $rc); continuing (STRICT_STARTUP=true would stop here)"
    failed=$((failed + 1))
}

qqq_present() {
    "$APP_PYTHON" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("QQQ") or u.find_spec("qqq") else 1)'
}

if [ "$skip_all" = true ]; then
    say "startup: skipped (SKIP_STARTUP_COMMANDS=true)"
else
    if [ "$test_env" = true ]; then
        check test-env make -C "$APP_DIR" --no-print-directory test-env
    fi
    if [ "$install_kernels" = true ]; then
        if qqq_present; then
            say "startup: install-kernel: QQQ already importable, nothing to install"
            summary+=("install-kernel skipped (present)")
        else
            check install-kernel "$APP_PYTHON" "$APP_DIR/compress_gptoss.py" install-kernel --yes
        fi
    fi
    if [ "$verify" = true ]; then
        if [ "$microbench" = true ]; then
            check verify-runtime "$APP_PYTHON" "$APP_DIR/compress_gptoss.py" verify-runtime --bench --shapes gpt-oss
        else
            check verify-runtime "$APP_PYTHON" "$APP_DIR/compress_gptoss.py" verify-runtime
        fi
    fi
    if [ ${#summary[@]} -gt 0 ]; then
        joined=$(printf '%s, ' "${summary[@]}")
        say "startup: ${joined%, } ($failed failed)"
    else
        say "startup: nothing to run (all checks off)"
    fi
fi

say "exec: $*"
exec "$@"
