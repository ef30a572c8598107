"""deploy/image: the image scripts refuse to start without their tools, in one line naming what is missing.

The build itself (minutes, root, podman, a Debian mirror and PyPI) runs in `.ci/run` through `make image`,
not here; docs/deploy.md has its figures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.helpers import DEPLOY, REPO

SCRIPTS = {"build-and-run.sh": "podman", "debian-base.sh": "debootstrap"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_missing_tool_is_one_clear_line(script: str, tmp_path: Path) -> None:
    # A PATH with only what the scripts run before their checks: the first tool they check is absent.
    for tool in ("bash", "dirname", "id"):
        found = shutil.which(tool)
        assert found, tool
        (tmp_path / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(tmp_path)}
    result = subprocess.run(
        [str(tmp_path / "bash"), str(DEPLOY / "image" / script)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{script}: {SCRIPTS[script]} is missing"), line
    assert result.stdout == ""
