"""The README's first hour, run as written: `make train`, train a tiny model, export it, `make run`, curl.

The commands are read from the README (between the ``first-hour`` markers), not copied here, so the
README cannot drift from what works. They run in a copy of the repository's tracked files, as a clone
would be. The copy's ``.venv`` stands for the one `make train` makes: it is this test run's virtualenv
with the install stamps set, so nothing is downloaded (the install commands themselves are checked with
``make -n``). Tiny on purpose: 32 px, 2 epochs, 12 images.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.service.test_lifecycle import free_port

pytestmark = pytest.mark.slow

README = REPO / "README.md"
BIG = 5 * 1024 * 1024  # larger tracked files (the bundled models) are linked, not copied


def first_hour() -> list[str]:
    text = README.read_text()
    block = re.search(r"<!-- first-hour:start -->\s*```bash\n(.*?)```\s*<!-- first-hour:end -->", text, re.S)
    assert block, "README.md has no first-hour block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def clone(dest: Path) -> None:
    """The tracked files of the working tree, as `git clone` would lay them out."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, names.decode().split("\0")):
        src, dst = REPO / name, dest / name
        if not src.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.stat().st_size > BIG:
            dst.symlink_to(src)
        else:
            shutil.copy2(src, dst)


def stand_in_venv(repo: Path) -> Path:
    """``repo/.venv``: this interpreter's virtualenv, with the stamps `make` looks for newer than pyproject.toml."""
    venv = repo / ".venv"
    (venv / "bin").mkdir(parents=True)
    prefix = Path(sys.prefix)
    shutil.copy2(prefix / "pyvenv.cfg", venv / "pyvenv.cfg")
    for lib in ("lib", "lib64", "include"):
        if (prefix / lib).exists():
            (venv / lib).symlink_to(prefix / lib)
    for tool in (prefix / "bin").iterdir():
        (venv / "bin" / tool.name).symlink_to(tool)
    for stamp in (".serve-stamp", ".train-stamp", ".test-stamp"):
        (venv / stamp).touch()
    return venv


def test_make_train_chooses_the_pytorch_build_explicitly() -> None:
    def dry(*args: str) -> str:
        # TORCH_LOCAL= : as on a machine whose pip has no local torch wheel (this one's has)
        out = subprocess.run(["make", "-n", "-B", "train", "VENV=/nonexistent/venv", "TORCH_LOCAL=", *args], cwd=REPO,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout

    pin = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pin
    cpu = dry()
    assert f"--index-url https://download.pytorch.org/whl/cpu 'torch=={pin.group(1)}'" in cpu
    assert cpu.index("whl/cpu") < cpu.index(".[serve,train]")  # the chosen build first, then the extra
    assert "whl/cu128" in dry("TORCH=cu128")
    assert "--index-url" not in dry("TORCH=pip")
    if list(Path("/opt/wheels").glob(f"torch-{pin.group(1)}+cpu-*.whl")):  # this workplace: its CPU wheel, no index
        local = subprocess.run(["make", "-n", "-B", "train", "VENV=/nonexistent/venv"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "TORCH=pip" in local and "--index-url" not in local
    bad = subprocess.run(["make", "-B", "train", "VENV=/nonexistent/venv", "TORCH=rocm"], cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0


def test_the_readme_first_hour_trains_exports_and_serves(tmp_path: Path) -> None:
    repo = tmp_path / "lesionserve"
    clone(repo)
    stand_in_venv(repo)
    # the copy's own code, whatever the stand-in venv's editable install points at
    env = {**os.environ, "PYTHONPATH": str(repo), "LESIONSERVE_LOG_FORMAT": "text", "PIP_FIND_LINKS": ""}
    # the README's port, moved to a free one: this machine may be running anything on 8001
    port = str(free_port())
    commands = [c.replace("8001", port) for c in first_hour()]
    assert [c.split()[0] for c in commands] == ["make", ".venv/bin/python", ".venv/bin/python", "make", "curl"]
    server: subprocess.Popen[bytes] | None = None
    log = tmp_path / "server.log"
    try:
        for command in commands:
            if command.endswith("&"):  # the server: in the background, as the README's shell would
                with log.open("wb") as out:
                    server = subprocess.Popen(shlex.split(command[:-1]), cwd=repo, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
                continue
            if command.startswith("curl"):
                answer = poll_until_answered(command, repo, server, log)
                continue
            done = subprocess.run(command, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        assert (repo / "runs" / "tiny" / "best.pt").is_file() and (repo / "runs" / "tiny.onnx").is_file()
        assert answer["model"]["name"] == "tiny" and answer["model"]["version"] == "0.0.1"
        assert {p["code"] for p in answer["predictions"]} == {"melanoma", "nevus"}
    finally:
        if server is not None:
            os.killpg(server.pid, 15)  # make and the server it started: this test's own process group
            server.wait(timeout=30)


def poll_until_answered(
    command: str, repo: Path, server: subprocess.Popen[bytes] | None, log: Path
) -> dict[str, object]:
    """Run the README's curl until the server it started answers (it warms up first); the bound only ends a hang."""
    assert server is not None, "the README starts no server before its curl"
    for _ in range(600):
        assert server.poll() is None, f"make run exited:\n{log.read_text()[-3000:]}"
        done = subprocess.run([*shlex.split(command), "--fail-with-body"], cwd=repo, capture_output=True, text=True)
        if done.returncode == 0:
            return json.loads(done.stdout)  # type: ignore[no-any-return]
        time.sleep(0.5)
    raise AssertionError(f"no answer from the README's server:\n{log.read_text()[-3000:]}")
