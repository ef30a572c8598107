"""``python -m tests.service.gated_server``: the real ``python -m service`` entry point with a gated model.

Lifecycle tests need requests that stay in flight for exactly as long as the test says, on
any hardware: a real network's speed would make "still running when the signal comes" a
matter of luck. So this process runs :func:`service.__main__.main` unchanged (settings,
uvicorn, signal handling, drain) with :class:`GatedModel` in place of the ONNX session.

Environment (besides the usual ``LESIONSERVE_*``):
    GATED_MODEL_HOLD: a path; while that file exists, every ``run`` after warm-up waits.
    GATED_MODEL_RUNS: a path; each ``run`` appends its batch size there, one per line, on entry.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from service import app
from service.config import Settings
from tests.service.conftest import FakeModel


class GatedModel(FakeModel):
    def __init__(self, hold: Path, runs: Path) -> None:
        super().__init__()
        self.hold, self.runs = hold, runs

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self.runs.open("a") as fh:
            fh.write(f"{len(batch)}\n")
        while self.hold.exists():
            time.sleep(0.01)
        return super().run(batch)


def main() -> int:
    hold, runs = Path(os.environ["GATED_MODEL_HOLD"]), Path(os.environ["GATED_MODEL_RUNS"])

    def load_model(settings: Settings) -> GatedModel:
        return GatedModel(hold, runs)

    app.load_model = load_model  # type: ignore[assignment]
    from service.__main__ import main as serve

    return serve()


if __name__ == "__main__":
    sys.exit(main())
