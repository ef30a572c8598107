"""deploy/lock: the hash-locked requirements the images install agree with pyproject.toml.

``make lock`` (tools/lock.py) writes them; these tests fail when the ``serve`` or ``gpu`` extra (or the
build-system requirements) changed and the locks were not made again: a requirement missing from a lock,
pinned outside its range, or a lock still carrying a top-level package pyproject.toml no longer names.
No network: the locks are read as text. What an extra of a requirement pulls in (``uvicorn[standard]``)
is not checked here: the image build's ``pip check`` refuses a lock that misses any of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.helpers import REPO
from tools.lock import PYTHON, inputs, lock_path

VARIANTS = sorted(PYTHON)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


@dataclass
class Pin:
    version: Version
    hashes: int
    via: list[str]  # empty: nothing in the lock pulled it in, so it is one of the inputs


def read_lock(path: Path) -> dict[str, Pin]:
    """Canonical name -> pin, from a ``uv pip compile --generate-hashes`` output."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := _PIN.match(line):
            current = pins[canonicalize_name(m.group(1))] = Pin(Version(m.group(2)), 0, [])
        elif current is not None and line.strip().startswith("--hash=sha256:"):
            current.hashes += 1
        elif current is not None and (via := re.match(r"\s+#\s+(?:via\s+)?([A-Za-z0-9][\w.-]*)$", line)):
            current.via.append(via.group(1))
    return pins


def disagreements(variant: str, pyproject: Path, lock: Path) -> list[str]:
    """What stands between pyproject.toml's requirements and a lock (empty: they agree)."""
    env = {"python_version": PYTHON[variant], "python_full_version": PYTHON[variant] + ".0"}
    env |= {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    pins = read_lock(lock)
    problems = []
    wanted: set[str] = set()
    for text in inputs(variant, pyproject):
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = str(canonicalize_name(req.name))
        wanted.add(name)
        if name not in pins:
            problems.append(f"{req} is not in {lock.name}")
        elif not req.specifier.contains(pins[name].version, prereleases=True):
            problems.append(f"{lock.name} pins {name}=={pins[name].version}, outside {req}")
    for pinned, pin in pins.items():
        if not pin.via and pinned not in wanted:
            problems.append(f"{lock.name} pins {pinned}, which pyproject.toml no longer asks for")
    return problems


@pytest.mark.parametrize("variant", VARIANTS)
def test_lock_agrees_with_pyproject(variant: str) -> None:
    assert disagreements(variant, REPO / "pyproject.toml", lock_path(variant)) == [], "run `make lock`"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pin_is_exact_and_hashed(variant: str) -> None:
    text = lock_path(variant).read_text(encoding="utf-8")
    pins = read_lock(lock_path(variant))
    assert len(pins) > 20
    assert all(pin.hashes >= 1 for pin in pins.values()), [n for n, p in pins.items() if not p.hashes]
    # nothing that pip would take unhashed or from elsewhere: no ranges, no URLs, no editable or local paths
    requirement_lines = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert all(_PIN.match(ln) for ln in requirement_lines), requirement_lines
    assert "file:" not in text and "--index-url" not in text and "--find-links" not in text


def test_gpu_lock_swaps_onnxruntime_and_shares_every_other_version() -> None:
    cpu, gpu = read_lock(lock_path("cpu")), read_lock(lock_path("gpu"))
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    shared = (set(cpu) & set(gpu)) - {"onnxruntime"}
    assert {n: (cpu[n].version, gpu[n].version) for n in shared if cpu[n].version != gpu[n].version} == {}


def test_a_changed_serve_extra_is_caught(tmp_path: Path) -> None:
    """Edits of pyproject.toml without `make lock`: a new requirement, a raised floor, a removed one."""
    original = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    cases = {
        "added": original.replace("serve = [\n", 'serve = [\n    "orjson>=3.9",\n', 1),
        "raised": original.replace('"fastapi>=0.110"', '"fastapi>=999"', 1),
        "removed": original.replace('    "dicomweb-client>=0.59",\n', "", 1),
    }
    expected = {"added": "orjson", "raised": "fastapi", "removed": "dicomweb-client"}
    for case, text in cases.items():
        assert text != original, case
        pyproject = tmp_path / f"{case}.toml"
        pyproject.write_text(text, encoding="utf-8")
        for variant in VARIANTS:
            found = disagreements(variant, pyproject, lock_path(variant))
            assert any(expected[case] in problem for problem in found), (case, variant, found)
