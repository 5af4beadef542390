"""The Docker files without a Docker daemon: shellcheck on every script, the Dockerfile's base image,
build args and layer order, the build context that .dockerignore leaves (docker-py's own matcher),
docker-compose.yml through `docker-compose config`, and build_test.sh against a stub `docker`."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["docker-entrypoint.sh", "build_test.sh", "setup_storage.sh"]
SERVICES = {"gptoss-compressor", "verify", "dequantize", "quantize-w4a8", "make", "debug", "gpu-app"}
STARTUP_DEFAULTS = {"AUTO_VERIFY": "true", "AUTO_TEST_ENV": "true", "AUTO_INSTALL_KERNELS": "false",
                    "RUN_MICROBENCH": "false", "SKIP_STARTUP_COMMANDS": "false", "STRICT_STARTUP": "false"}
# variables of the caller's shell that would change what docker-compose config prints
COMPOSE_VARS = ["NVIDIA_VISIBLE_DEVICES", "MODELS_DIR", "CACHE_DIR", "HF_CACHE_DIR", "INSTALL_QQQ", "CUDA_ARCH",
                "BASE_IMAGE", "IMAGE", "MODEL", "MODEL_IN", "OUT", *STARTUP_DEFAULTS]


def require_tool(name: str, package: str) -> str:
    """The path of a tool; CI (.ci/run installs it) fails without it, a developer's machine skips."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not found: apt-get install {package}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def dockerfile_instructions() -> list[str]:
    """One string per instruction, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for ln in (ROOT / "Dockerfile").read_text().splitlines():
        if ln.lstrip().startswith("#") or not ln.strip():
            continue
        cur += ln.rstrip("\\").strip() + " "
        if not ln.endswith("\\"):
            out.append(cur.strip())
            cur = ""
    return out


def dockerfile_args() -> dict:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M))


##### shell scripts #####

@pytest.mark.parametrize("script", SCRIPTS + [".ci/run"])
def test_shellcheck_clean(script):
    shellcheck = require_tool("shellcheck", "shellcheck")
    r = subprocess.run([shellcheck, "--severity=style", str(ROOT / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_executable_bash(script):
    path = ROOT / script
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(path, os.X_OK)
    mode = subprocess.run(["git", "ls-files", "-s", script], cwd=ROOT, capture_output=True, text=True).stdout
    assert mode == "" or mode.startswith("100755"), mode  # committed with the x bit (or not yet committed)


##### Dockerfile #####

def test_base_image_is_a_cuda_devel_pytorch_that_requirements_accept():
    base = dockerfile_args()["BASE_IMAGE"]
    m = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda(\d+)\.(\d+)-cudnn9-devel", base)
    assert m, base
    torch = tuple(map(int, m.group(1, 2, 3)))
    req = (ROOT / "requirements.txt").read_text()
    lo, hi = re.search(r"^torch>=([\d.]+),<=([\d.]+)$", req, re.M).groups()
    as_tuple = lambda v: tuple(int(x) for x in (v.split(".") + ["0", "0"])[:3])  # noqa: E731
    assert as_tuple(lo) <= torch <= as_tuple(hi), (base, lo, hi)
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=.*\nFROM \$\{BASE_IMAGE\}$", text, re.M), "FROM must use the build arg"


def test_build_args_and_their_effect():
    args = dockerfile_args()
    assert args["CUDA_ARCH"] == "8.6" and args["INSTALL_QQQ"] == "true"
    text = (ROOT / "Dockerfile").read_text()
    assert "TORCH_CUDA_ARCH_LIST=${CUDA_ARCH}" in text
    install = re.search(r'case "\$INSTALL_QQQ" in(.*?)esac', text, re.S).group(1)
    assert "true) python compress_gptoss.py install-kernel --yes" in install
    assert "false)" in install and "exit 2" in install  # any other value stops the build


def test_layer_order_caches_pip_and_keeps_the_base_torch():
    lines = dockerfile_instructions()
    idx = {ln: i for i, ln in enumerate(lines)}
    req_copy = idx["COPY requirements.txt ."]
    pip = next(i for i, ln in enumerate(lines) if "pip install" in ln)
    assert req_copy < pip < idx["COPY . ."], lines
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install -c /tmp/torch-constraint.txt -r requirements.txt" in text
    assert "torch.version.cuda is None" in text  # a CPU torch after pip fails the build
    # the kernels do not depend on tests or docs: only the CLI and Makefile are copied before them
    assert idx["COPY compress_gptoss.py Makefile ./"] < idx["COPY . ."]


def test_entrypoint_volumes_and_default_command():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["docker-entrypoint.sh"]' in text and 'CMD ["bash"]' in text
    assert "COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh" in text
    vol = re.search(r"^VOLUME (\[.*\])$", text, re.M).group(1)
    assert set(yaml.safe_load(vol)) == {"/workspace/app/models", "/workspace/app/offload_cache",
                                        "/root/.cache/huggingface"}
    assert "APP_PYTHON=python" in text  # the Makefile uses the image's python, not a mounted .venv


def test_dockerignore_keeps_models_and_caches_out_of_the_build_context(tmp_path):
    """docker-py's exclude_paths is the matcher docker-compose builds with."""
    python = "/usr/bin/python3"
    r = subprocess.run([python, "-c", "import docker.utils.build"], capture_output=True)
    if r.returncode:
        require_tool("docker-py-missing", "python3-docker")  # fails in CI, skips elsewhere
    ctx = tmp_path / "ctx"
    files = ["compress_gptoss.py", "Makefile", "requirements.txt", "docker-entrypoint.sh", "tests/tiny_gptoss.py",
             "models/gpt-oss-120b-bf16/model-00001.safetensors", "offload_cache/x.dat", ".venv/bin/python",
             ".git/HEAD", "demo/tiny/model.safetensors", ".env", "hf.partial", "tests/__pycache__/a.pyc",
             "weights.safetensors", "examples/w.safetensors", "hf_cache/hub/x"]
    for f in files:
        (ctx / f).parent.mkdir(parents=True, exist_ok=True)
        (ctx / f).write_text("x")
    shutil.copy(ROOT / ".dockerignore", ctx / ".dockerignore")
    code = ("import sys; from docker.utils.build import exclude_paths;"
            "pats=[l.strip() for l in open(sys.argv[1] + '/.dockerignore') if l.strip() and not l.startswith('#')];"
            "print('\\n'.join(sorted(exclude_paths(sys.argv[1], pats))))")
    kept = set(subprocess.run([python, "-c", code, str(ctx)], capture_output=True, text=True,
                              check=True).stdout.split())
    assert {"compress_gptoss.py", "Makefile", "requirements.txt", "docker-entrypoint.sh",
            "tests/tiny_gptoss.py"} <= kept
    leaked = [f for f in kept if f.split("/")[0] in {"models", "offload_cache", "hf_cache", ".venv", ".git", "demo"}
              or f.endswith((".safetensors", ".partial", ".pyc")) or f == ".env"]
    assert leaked == []


##### docker-compose.yml #####

def compose_config(project: Path, env: dict | None = None) -> dict:
    exe = require_tool("docker-compose", "docker-compose")
    full_env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARS} | (env or {})
    r = subprocess.run([exe, "config"], cwd=project, capture_output=True, text=True, env=full_env, timeout=60)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


@pytest.fixture
def compose_project(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "docker-compose.yml", proj)
    return proj


def volumes(service: dict) -> dict:
    """container path -> host path"""
    out = {}
    for v in service["volumes"]:
        host, container, *_ = v.split(":") if isinstance(v, str) else (v["source"], v["target"])
        out[container] = host
    return out


def test_compose_services_volumes_and_startup_defaults(compose_project):
    cfg = compose_config(compose_project, {"HOME": "/home/someone"})
    assert set(cfg["services"]) == SERVICES
    for name, svc in cfg["services"].items():
        assert svc["image"] == "gptoss-compressor:cu128", name
        assert svc["runtime"] == "nvidia", name
        env = svc["environment"]
        assert env["NVIDIA_VISIBLE_DEVICES"] == "all", name
        assert volumes(svc) == {"/workspace/app": str(compose_project),
                                "/workspace/app/models": str(compose_project / "models"),
                                "/workspace/app/offload_cache": str(compose_project / "offload_cache"),
                                "/root/.cache/huggingface": "/home/someone/.cache/huggingface"}, name
        assert svc["working_dir"] == "/workspace/app"
        assert svc["init"] is True and svc["shm_size"] == "16g", name  # signals reach the command
        assert svc["build"]["args"] == {"BASE_IMAGE": dockerfile_args()["BASE_IMAGE"], "CUDA_ARCH": "8.6",
                                        "INSTALL_QQQ": "true"}, name
        # Makefile variables pass through only when set: an empty MODEL_IN would defeat `MODEL_IN ?=`
        assert env["MODEL_IN"] is None and env["OUT"] is None, name
        expected = dict(STARTUP_DEFAULTS)
        if name == "verify":
            expected["AUTO_VERIFY"] = "false"
        if name == "debug":
            expected["SKIP_STARTUP_COMMANDS"] = "true"
        if name == "gpu-app":
            expected.update(AUTO_VERIFY="false", AUTO_TEST_ENV="false")
        assert {k: env[k] for k in expected} == expected, name


def test_compose_commands_name_real_make_targets(compose_project):
    cfg = compose_config(compose_project)["services"]
    assert cfg["gptoss-compressor"]["command"] == ["bash"]
    assert cfg["debug"]["command"] == ["bash"]
    assert cfg["verify"]["command"] == ["make", "verify"]
    assert cfg["dequantize"]["command"] == ["make", "dequant"]
    assert cfg["quantize-w4a8"]["command"] == ["make", "w4a8exp_w4a16mw"]
    # `docker-compose run make TARGET`: the arguments go to make, through the entrypoint
    assert cfg["make"]["entrypoint"] == ["docker-entrypoint.sh", "make"]
    assert cfg["make"]["command"] == ["help"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("verify", "dequant", "w4a8exp_w4a16mw", "help"):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_compose_overrides_from_the_shell(compose_project):
    cfg = compose_config(compose_project, {"NVIDIA_VISIBLE_DEVICES": "0,1", "MODELS_DIR": "/big/models",
                                           "CACHE_DIR": "/big/offload", "HF_CACHE_DIR": "/big/hf",
                                           "INSTALL_QQQ": "false", "RUN_MICROBENCH": "true",
                                           "MODEL": "openai/gpt-oss-20b"})
    for name, svc in cfg["services"].items():
        assert svc["environment"]["NVIDIA_VISIBLE_DEVICES"] == "0,1"
        assert svc["environment"]["RUN_MICROBENCH"] == "true"
        assert svc["environment"]["MODEL"] == "openai/gpt-oss-20b"
        assert svc["build"]["args"]["INSTALL_QQQ"] == "false"  # INSTALL_QQQ=false docker-compose build
        v = volumes(svc)
        assert (v["/workspace/app/models"], v["/workspace/app/offload_cache"], v["/root/.cache/huggingface"]) == \
            ("/big/models", "/big/offload", "/big/hf"), name


def test_compose_reads_the_env_file_setup_storage_writes(compose_project, tmp_path):
    shutil.copy2(ROOT / "setup_storage.sh", compose_project)
    r = subprocess.run(["bash", str(compose_project / "setup_storage.sh"), str(tmp_path / "disk")],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    v = volumes(compose_config(compose_project)["services"]["dequantize"])
    assert v["/workspace/app/models"] == str(tmp_path / "disk" / "models")
    assert v["/workspace/app/offload_cache"] == str(tmp_path / "disk" / "offload_cache")
    assert v["/root/.cache/huggingface"] == str(tmp_path / "disk" / "huggingface")


##### build_test.sh against a stub docker #####

DOCKER_STUB = r"""#!/usr/bin/env bash
# records its command line; `run` executes `sh -c` commands and fails those matching STUB_FAIL_RUN
echo "docker $*" >> "$STUB_LOG"
case "$1" in
  info) [ "$2" = --format ] && { echo "${STUB_RUNTIMES:-{\"runc\":{}}}"; exit 0; }; exit "${STUB_INFO_RC:-0}" ;;
  image) exit "${STUB_INSPECT_RC:-0}" ;;
  pull) exit "${STUB_PULL_RC:-0}" ;;
  build) exit "${STUB_BUILD_RC:-0}" ;;
  run)
    args=("$@")
    for i in "${!args[@]}"; do
      if [ "${args[$i]}" = "$STUB_IMAGE" ]; then cmd=("${args[@]:$((i + 1))}"); break; fi
    done
    if [ "${cmd[0]}" = sh ]; then exec "${cmd[@]}"; fi
    if [ -n "${STUB_FAIL_RUN:-}" ] && [[ "${cmd[*]}" == *"$STUB_FAIL_RUN" ]]; then exit 1; fi
    exit 0 ;;
esac
exit 0
"""


@pytest.fixture
def docker_stub(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "docker").write_text(DOCKER_STUB)
    (bindir / "docker").chmod(0o755)
    return tmp_path


def build_test(stub_dir: Path, with_docker=True, **env):
    bindir = stub_dir / "bin"
    if not with_docker:
        (bindir / "docker").unlink()
    # PATH: the stub dir, and the system's tools without any real docker
    tools = stub_dir / "tools"
    tools.mkdir(exist_ok=True)
    for t in ("sed", "dirname", "grep", "cat", "sh", "bash", "env", "basename"):
        if not (tools / t).exists() and shutil.which(t):
            (tools / t).symlink_to(shutil.which(t))
    log = stub_dir / "docker.log"
    log.unlink(missing_ok=True)
    full_env = {"PATH": f"{bindir}:{tools}", "STUB_LOG": str(log), "STUB_IMAGE": "gptoss-compressor:cu128",
                "HOME": str(stub_dir), **env}
    r = subprocess.run(["/bin/bash", str(ROOT / "build_test.sh")], capture_output=True, text=True, env=full_env,
                       timeout=60)
    return r, (log.read_text().splitlines() if log.exists() else [])


def test_build_test_without_docker_client_exits_3(docker_stub):
    r, _ = build_test(docker_stub, with_docker=False)
    assert r.returncode == 3
    assert "no docker client on PATH" in r.stdout


def test_build_test_without_daemon_exits_3(docker_stub):
    r, calls = build_test(docker_stub, STUB_INFO_RC="1")
    assert r.returncode == 3
    assert "no Docker daemon answers" in r.stdout
    assert calls == ["docker info"]


def test_build_test_without_pullable_base_image_exits_4(docker_stub):
    r, calls = build_test(docker_stub, STUB_INSPECT_RC="1", STUB_PULL_RC="1")
    base = dockerfile_args()["BASE_IMAGE"]
    assert r.returncode == 4
    assert f"base image {base} is not here and cannot be pulled" in r.stdout
    assert calls[-1] == f"docker pull {base}"
    assert not any(c.startswith("docker build") for c in calls)


def test_build_test_build_failure_exits_2(docker_stub):
    r, calls = build_test(docker_stub, STUB_BUILD_RC="1")
    assert r.returncode == 2 and "docker build failed" in r.stdout
    assert not any(c.startswith("docker run") for c in calls)


def test_build_test_builds_then_runs_every_check(docker_stub):
    r, calls = build_test(docker_stub, BASE_IMAGE="local/cuda-devel:1", INSTALL_QQQ="false")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "docker build -t gptoss-compressor:cu128 --build-arg BASE_IMAGE=local/cuda-devel:1 " \
           "--build-arg CUDA_ARCH=8.6 --build-arg INSTALL_QQQ=false ." in calls
    runs = [c.split("gptoss-compressor:cu128 ", 1)[1] for c in calls if c.startswith("docker run")]
    assert runs == ["true", "sh -c exit 7", "make test-env", "python compress_gptoss.py --help",
                    "python compress_gptoss.py dequantize --help", "python compress_gptoss.py quantize --help",
                    "python compress_gptoss.py install-kernel --help",
                    "python compress_gptoss.py verify-runtime --help",
                    "python compress_gptoss.py verify-runtime", "make smoke"]
    assert not any("--gpus" in c for c in calls)  # no nvidia runtime: no GPU flag
    assert "gptoss-compressor:cu128: 10 passed, 0 failed" in r.stdout


def test_build_test_failing_check_exits_1_and_says_which(docker_stub):
    r, _ = build_test(docker_stub, STUB_FAIL_RUN="make smoke")
    assert r.returncode == 1
    assert "FAILED: tiny GPT-OSS demo (make smoke) (exit 1)" in r.stdout
    assert "9 passed, 1 failed" in r.stdout


def test_build_test_verify_runtime_counts_only_with_a_gpu(docker_stub):
    r, _ = build_test(docker_stub, STUB_FAIL_RUN="verify-runtime")
    assert r.returncode == 0 and "info: verify-runtime exited 1" in r.stdout
    r, calls = build_test(docker_stub, STUB_FAIL_RUN="verify-runtime", STUB_RUNTIMES='{"nvidia":{},"runc":{}}')
    assert r.returncode == 1 and "FAILED: verify-runtime (exit 1)" in r.stdout
    assert all("--gpus all" in c for c in calls if c.startswith("docker run") and "exit 7" not in c)


##### the README sections match the files #####

def readme_text() -> str:
    frag = ROOT / "docs" / "README-docker.md"
    return frag.read_text() if frag.exists() else (ROOT / "README.md").read_text()


def test_readme_names_only_real_make_targets():
    targets = set(re.findall(r"^([A-Za-z0-9_-]+):(?!=)", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"\bmake ([a-z][a-z0-9_-]+)", readme_text())) - {"test"}  # 'make test' exists too
    assert named and named <= targets, named - targets


def test_readme_startup_table_matches_the_entrypoint():
    section = readme_text().split("### Startup", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| `(true|false)` \|", section, re.M)
    assert {name for name, _ in rows} == set(STARTUP_DEFAULTS)
    ep = (ROOT / "docker-entrypoint.sh").read_text()
    for name, default in rows:
        assert re.search(rf"\$\(flag {name} {default}\)", ep), (name, default)
        assert STARTUP_DEFAULTS[name] == default


def test_readme_build_test_exit_codes_match_the_script():
    script = (ROOT / "build_test.sh").read_text()
    for code, meaning in re.findall(r"^\| (\d) \| (.+) \|$", readme_text(), re.M):
        if code in "34":
            assert re.search(rf"exit {code}\b", script), code
    assert "exit 3" in script and "exit 4" in script


def test_readme_storage_needs_match_the_script():
    text = " ".join(readme_text().split())
    script = (ROOT / "setup_storage.sh").read_text()
    assert "NEED_SEQUENTIAL_GB=100" in script and "NEED_AUTO_GB=500" in script
    assert "100 GB with `--device-map sequential`" in text and "500 GB with `--device-map auto`" in text
