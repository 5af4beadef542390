"""setup_storage.sh in temporary folders: the storage folders, the links in the project, the .env that
docker-compose reads, running it twice, and the refusals (one clear line, exit 2, nothing changed)."""
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "setup_storage.sh"
LINKS = {"models": "models", "offload_cache": "offload_cache", "hf_cache": "huggingface"}


@pytest.fixture
def project(tmp_path):
    proj = tmp_path / "project"
    proj.mkdir()
    shutil.copy2(SCRIPT, proj / "setup_storage.sh")
    return proj


def setup_storage(project: Path, *args, home: Path | None = None, user: str | None = None):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home or project.parent / "home")}
    cmd = ["bash", str(project / "setup_storage.sh"), *map(str, args)]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)


def read_env(project: Path) -> dict:
    return dict(ln.split("=", 1) for ln in (project / ".env").read_text().splitlines()
                if ln and not ln.startswith("#"))


def test_creates_folders_links_and_env(project, tmp_path):
    storage = tmp_path / "big disk" / "gptoss"  # a space in the path must survive
    r = setup_storage(project, storage)
    assert r.returncode == 0, r.stderr
    for link, folder in LINKS.items():
        assert (storage / folder).is_dir()
        assert (project / link).is_symlink()
        assert os.readlink(project / link) == str(storage / folder)
    assert read_env(project) == {"MODELS_DIR": f"{storage}/models", "CACHE_DIR": f"{storage}/offload_cache",
                                 "HF_CACHE_DIR": f"{storage}/huggingface"}
    # free space against the README's needs, with a number
    free = [ln for ln in r.stdout.splitlines() if ln.startswith("free: ")]
    assert len(free) == 1 and re.match(r"free: \d+ GB at .*(100 GB).*(500 GB)", free[0]), r.stdout


def test_running_twice_changes_nothing_and_keeps_other_env_lines(project, tmp_path):
    (project / ".env").write_text("HF_TOKEN=hf_secret\nMODELS_DIR=/old/models\nNVIDIA_VISIBLE_DEVICES=0\n")
    storage = tmp_path / "store"
    assert setup_storage(project, storage).returncode == 0
    first = (project / ".env").read_text()
    (storage / "models" / "keep.txt").write_text("a model")
    r = setup_storage(project, storage)
    assert r.returncode == 0, r.stderr
    assert (project / ".env").read_text() == first
    assert "(already)" in r.stdout
    env = read_env(project)
    assert env["HF_TOKEN"] == "hf_secret" and env["NVIDIA_VISIBLE_DEVICES"] == "0"
    assert env["MODELS_DIR"] == f"{storage}/models"
    assert first.count("MODELS_DIR=") == 1
    assert (project / "models" / "keep.txt").read_text() == "a model"


def test_moving_to_another_path_relinks(project, tmp_path):
    assert setup_storage(project, tmp_path / "a").returncode == 0
    r = setup_storage(project, tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert os.readlink(project / "models") == str(tmp_path / "b" / "models")
    assert f"was -> {tmp_path / 'a' / 'models'}" in r.stdout
    assert read_env(project)["CACHE_DIR"] == f"{tmp_path / 'b'}/offload_cache"


def test_default_path_is_under_home(project, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = setup_storage(project, home=home)
    assert r.returncode == 0, r.stderr
    assert (home / "gptoss-models" / "models").is_dir()
    assert read_env(project)["MODELS_DIR"] == f"{home}/gptoss-models/models"


def test_relative_path_is_made_absolute(project, tmp_path):
    r = subprocess.run(["bash", str(project / "setup_storage.sh"), "rel-store"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert read_env(project)["MODELS_DIR"] == f"{tmp_path}/rel-store/models"


def assert_refused(r, project, message):
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr  # one line
    assert r.stderr.startswith("setup_storage.sh: error: ") and message in r.stderr, r.stderr
    assert not (project / ".env").exists()
    assert not any((project / link).is_symlink() for link in LINKS)


def test_refuses_a_file(project, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    assert_refused(setup_storage(project, f), project, f"{f} is a file, not a folder")


def test_refuses_a_path_it_cannot_create(project, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    assert_refused(setup_storage(project, f / "sub"), project, f"cannot create {f / 'sub'}")


def test_refuses_a_folder_that_is_not_writable(tmp_path):
    # root writes anywhere: run the script as nobody on a folder owned by root
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        proj = base / "project"
        proj.mkdir(mode=0o777)
        proj.chmod(0o777)
        shutil.copy2(SCRIPT, proj / "setup_storage.sh")
        ro = base / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        if os.geteuid() == 0:
            r = setup_storage(proj, ro, home=base, user="65534")
        else:
            r = setup_storage(proj, ro, home=base)
        assert_refused(r, proj, f"{ro} is not writable")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_refuses_to_hide_files_in_a_real_models_folder(project, tmp_path):
    (project / "models").mkdir()
    (project / "models" / "gpt-oss-120b-bf16.safetensors").write_text("weights")
    r = setup_storage(project, tmp_path / "store")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"setup_storage.sh: error: ./models is a folder with files: move them to "
                                f"{tmp_path / 'store' / 'models'}, remove ./models, run again")
    assert (project / "models" / "gpt-oss-120b-bf16.safetensors").exists()


def test_an_empty_models_folder_is_replaced_by_the_link(project, tmp_path):
    (project / "models").mkdir()
    r = setup_storage(project, tmp_path / "store")
    assert r.returncode == 0, r.stderr
    assert (project / "models").is_symlink()


def test_refuses_two_paths(project, tmp_path):
    assert_refused(setup_storage(project, tmp_path / "a", tmp_path / "b"), project, "one PATH at most")
