"""docker-entrypoint.sh under every combination of its variables, with `make` and `python` replaced by
recording stubs on PATH: the right startup commands in the right order, then `exec` of the user's
command (same PID, its exit code), and STRICT_STARTUP deciding whether a failed check stops it."""
import itertools
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "docker-entrypoint.sh"
APP = "/app-under-test"
FLAGS = ["SKIP_STARTUP_COMMANDS", "AUTO_TEST_ENV", "AUTO_INSTALL_KERNELS", "AUTO_VERIFY", "RUN_MICROBENCH"]
DEFAULTS = {"SKIP_STARTUP_COMMANDS": False, "AUTO_TEST_ENV": True, "AUTO_INSTALL_KERNELS": False,
            "AUTO_VERIFY": True, "RUN_MICROBENCH": False}
QQQ_PROBE = "python -c import importlib.util"

STUB = """#!/bin/sh
# records its command line; exits STUB_RC_<name> (default 0); python -c is the QQQ probe
name=$(basename "$0")
echo "$name $*" >> "$STUB_LOG"
if [ "$name" = python ] && [ "$1" = -c ]; then exit "${STUB_QQQ_RC:-1}"; fi
case "$*" in
  *test-env*) exit "${STUB_RC_TEST_ENV:-0}" ;;
  *install-kernel*) exit "${STUB_RC_INSTALL:-0}" ;;
  *verify-runtime*) exit "${STUB_RC_VERIFY:-0}" ;;
esac
exit 0
"""


@pytest.fixture
def stubs(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("make", "python", "bash"):
        (bindir / name).write_text(STUB)
        (bindir / name).chmod(0o755)
    return tmp_path


def run_entrypoint(stubs: Path, args: list[str], env: dict[str, str]):
    log = stubs / "log"
    log.unlink(missing_ok=True)
    full_env = {"PATH": f"{stubs / 'bin'}:/usr/bin:/bin", "STUB_LOG": str(log), "APP_DIR": APP, **env}
    # /bin/bash explicitly: the stub `bash` on PATH is the default interactive shell being exec'ed
    r = subprocess.run(["/bin/bash", str(ENTRYPOINT), *args], capture_output=True, text=True, env=full_env,
                       timeout=30)
    lines = log.read_text().splitlines() if log.exists() else []
    return r, lines


def expected_commands(flags: dict, qqq_present: bool) -> list[str]:
    if flags["SKIP_STARTUP_COMMANDS"]:
        return []
    cmds = []
    if flags["AUTO_TEST_ENV"]:
        cmds.append(f"make -C {APP} --no-print-directory test-env")
    if flags["AUTO_INSTALL_KERNELS"]:
        cmds.append(QQQ_PROBE)
        if not qqq_present:
            cmds.append(f"python {APP}/compress_gptoss.py install-kernel --yes")
    if flags["AUTO_VERIFY"]:
        bench = " --bench --shapes gpt-oss" if flags["RUN_MICROBENCH"] else ""
        cmds.append(f"python {APP}/compress_gptoss.py verify-runtime{bench}")
    return cmds


COMBOS = list(itertools.product([False, True], repeat=len(FLAGS)))


@pytest.mark.parametrize("qqq_present", [False, True], ids=["qqq-absent", "qqq-present"])
def test_every_variable_combination_runs_the_right_commands_in_order(stubs, qqq_present):
    user = stubs / "user-ran"
    for combo in COMBOS:
        flags = dict(zip(FLAGS, combo))
        env = {k: "true" if v else "false" for k, v in flags.items()}
        env["STUB_QQQ_RC"] = "0" if qqq_present else "1"
        user.unlink(missing_ok=True)
        r, lines = run_entrypoint(stubs, ["sh", "-c", f"echo ran > {user}; exit 5"], env)
        got = [QQQ_PROBE if ln.startswith(QQQ_PROBE) else ln for ln in lines]
        assert got == expected_commands(flags, qqq_present), (env, r.stderr)
        assert r.returncode == 5, (env, r.stderr)
        assert user.read_text() == "ran\n", env


def test_defaults_are_the_seeds(stubs):
    """No variable set: test-env, then verify-runtime without --bench, nothing installed."""
    r, lines = run_entrypoint(stubs, ["true"], {})
    assert r.returncode == 0, r.stderr
    assert lines == expected_commands(DEFAULTS, qqq_present=False)
    assert "test-env ok, verify-runtime ok (0 failed)" in r.stderr


def test_no_command_execs_an_interactive_shell(stubs):
    r, lines = run_entrypoint(stubs, [], {"SKIP_STARTUP_COMMANDS": "true"})
    assert r.returncode == 0, r.stderr
    assert lines == ["bash "]


def test_exec_replaces_the_entrypoint_process(stubs):
    """The user's command keeps the entrypoint's PID: it is PID 1 in the container and gets signals."""
    pidfile = stubs / "pid"
    env = {"PATH": f"{stubs / 'bin'}:/usr/bin:/bin", "STUB_LOG": str(stubs / "log"), "APP_DIR": APP,
           "AUTO_TEST_ENV": "false"}
    p = subprocess.Popen(["/bin/bash", str(ENTRYPOINT), "sh", "-c", f"echo $$ > {pidfile}; exit 3"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert p.wait(timeout=30) == 3
    assert int(pidfile.read_text()) == p.pid


def test_command_not_found_is_127(stubs):
    r, _ = run_entrypoint(stubs, ["no-such-command-xyz"], {"SKIP_STARTUP_COMMANDS": "true"})
    assert r.returncode == 127


@pytest.mark.parametrize("failing,stub_env", [
    ("test-env", {"STUB_RC_TEST_ENV": "4"}),
    ("install-kernel", {"STUB_RC_INSTALL": "4", "AUTO_INSTALL_KERNELS": "true"}),
    ("verify-runtime", {"STUB_RC_VERIFY": "4"}),
])
def test_failed_check_is_reported_and_the_command_still_runs(stubs, failing, stub_env):
    r, lines = run_entrypoint(stubs, ["sh", "-c", "exit 0"], stub_env)
    assert r.returncode == 0, r.stderr
    assert f"{failing} FAILED (exit 4)" in r.stderr
    assert "(1 failed)" in r.stderr
    assert "verify-runtime" in lines[-1]  # the checks after the failed one still ran


@pytest.mark.parametrize("failing,stub_env,ran_before", [
    ("test-env", {"STUB_RC_TEST_ENV": "4"}, 1),
    ("install-kernel", {"STUB_RC_INSTALL": "4", "AUTO_INSTALL_KERNELS": "true"}, 3),
    ("verify-runtime", {"STUB_RC_VERIFY": "4"}, 2),
])
def test_strict_startup_stops_at_the_failed_check_with_its_code(stubs, failing, stub_env, ran_before):
    user = stubs / "user-ran"
    r, lines = run_entrypoint(stubs, ["sh", "-c", f"touch {user}"], {**stub_env, "STRICT_STARTUP": "true"})
    assert r.returncode == 4, r.stderr
    assert not user.exists()
    assert len(lines) == ran_before, lines  # nothing after the failed check
    assert f"{failing} failed (exit 4); STRICT_STARTUP=true" in r.stderr


@pytest.mark.parametrize("value", ["TRUE", "1", "yes", "True"])
def test_true_spellings(stubs, value):
    r, lines = run_entrypoint(stubs, ["true"], {"SKIP_STARTUP_COMMANDS": value})
    assert r.returncode == 0 and lines == []


@pytest.mark.parametrize("var", FLAGS + ["STRICT_STARTUP"])
def test_a_value_that_is_not_a_boolean_stops_before_anything_runs(stubs, var):
    user = stubs / "user-ran"
    r, lines = run_entrypoint(stubs, ["sh", "-c", f"touch {user}"], {var: "maybe"})
    assert r.returncode == 64
    assert lines == [] and not user.exists()
    assert r.stderr.strip().splitlines()[-1].endswith(f"{var}=maybe is not true or false: "
                                                      f"fix the variable (docker run -e {var}=true|false)")


def test_app_python_is_used_for_the_checks(stubs):
    py = stubs / "bin" / "python3.11-custom"
    py.write_text(STUB)
    py.chmod(0o755)
    r, lines = run_entrypoint(stubs, ["true"], {"APP_PYTHON": "python3.11-custom", "AUTO_TEST_ENV": "false"})
    assert r.returncode == 0, r.stderr
    assert lines == [f"python3.11-custom {APP}/compress_gptoss.py verify-runtime"]
