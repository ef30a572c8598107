"""The serving images' hash-locked requirements (``deploy/lock/{cpu,gpu}.txt``), made from pyproject.toml.

``make lock`` runs ``python tools/lock.py``, which resolves each variant with ``uv pip compile
--generate-hashes`` against PyPI and writes its lock; ``deploy/Dockerfile`` and ``deploy/Dockerfile.gpu``
install from them with ``pip install --require-hashes --no-deps``. ``tests/deploy/test_lock.py`` fails when
a lock no longer satisfies what :func:`inputs` reads from pyproject.toml, so an edit of the ``serve`` extra
without ``make lock`` is caught.

What each lock holds:
    cpu: the ``serve`` extra, for CPython 3.11 (``python:3.11-slim-bookworm`` and Debian bookworm).
    gpu: the ``serve`` extra with ``onnxruntime`` replaced by the ``gpu`` extra (``onnxruntime-gpu``: with
         both installed, which one imports is undefined), for CPython 3.12 (Ubuntu 24.04's, the CUDA base);
         the CPU lock constrains it, so every package both images share has the same version in both.
    both: pyproject.toml's ``[build-system] requires``, since the images build the project itself with
         ``--no-build-isolation``: its build backend comes hash-checked from the lock too, not from PyPI's newest.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK_DIR = REPO / "deploy" / "lock"
# variant -> the Python its image runs (minor version): the resolution is made for that interpreter.
PYTHON = {"cpu": "3.11", "gpu": "3.12"}
# Both images are linux/amd64; the hashes cover every file of each pinned release, the markers this platform.
PLATFORM = "x86_64-unknown-linux-gnu"
# PyPI itself, named explicitly: a machine's own wheel folders or mirrors must never end up in the lock.
INDEX = "https://pypi.org/simple"


def inputs(variant: str, pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The requirements a variant's lock must satisfy, as written in pyproject.toml.

    Args:
        variant: ``cpu`` or ``gpu``.
        pyproject: the project file to read.

    Returns:
        Requirement strings: the ``serve`` extra (for ``gpu``: ``onnxruntime`` swapped for the ``gpu``
        extra), then the build-system requirements.
    """
    if variant not in PYTHON:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(PYTHON)}")
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    extras = project["project"]["optional-dependencies"]
    serve = list(extras["serve"])
    if variant == "gpu":
        serve = [r for r in serve if canonicalize_name(Requirement(r).name) != "onnxruntime"] + list(extras["gpu"])
    return serve + list(project["build-system"]["requires"])


def lock_path(variant: str) -> Path:
    """Where a variant's lock lives."""
    return LOCK_DIR / f"{variant}.txt"


def compile_lock(variant: str, uv: str) -> None:
    """Resolve a variant with uv and write its lock (hashes of every file of every pinned release)."""
    args = [uv, "pip", "compile", "-", "--output-file", str(lock_path(variant).relative_to(REPO))]
    args += ["--generate-hashes", "--python-version", PYTHON[variant], "--python-platform", PLATFORM]
    args += ["--index-url", INDEX, "--no-config", "--custom-compile-command", "make lock", "--quiet"]
    if variant == "gpu":
        args += ["--constraints", str(lock_path("cpu").relative_to(REPO))]
    stdin = "".join(r + "\n" for r in inputs(variant))
    subprocess.run(args, input=stdin, text=True, cwd=REPO, check=True)


def main(argv: list[str]) -> int:
    uv = argv[0] if argv else str(Path(sys.executable).parent / "uv")
    if not Path(uv).is_file():
        print(f"lock.py: uv is missing ({uv}); install it: {sys.executable} -m pip install uv", file=sys.stderr)
        return 2
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for variant in ("cpu", "gpu"):  # cpu first: it constrains gpu
        compile_lock(variant, uv)
        print(lock_path(variant).relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
