"""Knowledge distillation: teachers on a subset of classes map onto the student's order, the loss is
the KL to the teachers' softened outputs (mixed with CutMix's lam), and a run with a .pt and an
.onnx teacher trains end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TEST_DATA
from tests.tiny_model import make_tiny_onnx
from train.checkpoint import load_checkpoint
from train.config import load_config
from train.data import load_labelled
from train.distill import Distiller, Teacher, _map_classes, load_teachers
from train.run import run

STUDENT = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def test_specialist_classes_map_onto_the_student_order() -> None:
    assert _map_classes("t", ["nv", "mel"], STUDENT).tolist() == [5, 4]
    with pytest.raises(ValueError, match=r"\['scc'\] are not among the student's"):
        _map_classes("t", ["mel", "scc"], STUDENT)
    with pytest.raises(ValueError, match="at least 2 classes"):
        _map_classes("t", ["mel"], STUDENT)


def _teacher(logp: torch.Tensor, index: list[int]) -> Teacher:
    return Teacher("t", logp, torch.tensor(index))


def test_loss_is_zero_when_the_student_agrees_and_grows_when_it_does_not() -> None:
    torch.manual_seed(0)
    teacher_logits = torch.randn(6, 2)
    t = _teacher(torch.log_softmax(teacher_logits, 1), [4, 5])  # a mel-vs-nv specialist
    kd = Distiller([t], alpha=0.5, temperature=2.0)
    rows = torch.arange(6)
    student = torch.randn(6, 7) * 3
    student[:, [4, 5]] = teacher_logits + 1.0  # same distribution on the specialist's classes (shift-invariant)
    assert float(kd.loss(student, rows, rows, 1.0)) == pytest.approx(0.0, abs=1e-6)
    student[:, 4] += 2.0
    assert float(kd.loss(student, rows, rows, 1.0)) > 0.01


def test_mixed_batches_mix_the_teacher_targets_with_lam() -> None:
    logp = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    kd = Distiller([_teacher(logp, [0, 1])], alpha=1.0, temperature=1.0)
    target = 0.25 * logp.exp()[0] + 0.75 * logp.exp()[1]
    student = target.log()[None]
    assert float(kd.loss(student, torch.tensor([0]), torch.tensor([1]), 0.25)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd.loss(student, torch.tensor([0]), torch.tensor([0]), 1.0)) > 0.1


def test_select_keeps_the_rows_of_the_training_part() -> None:
    logp = torch.log_softmax(torch.randn(5, 3), 1)
    kd = Distiller([_teacher(logp, [0, 1, 2])], 0.5, 2.0).select(np.array([3, 1]))
    torch.testing.assert_close(kd.teachers[0].logp, logp[[3, 1]])


def test_run_distils_from_a_checkpoint_and_an_onnx_teacher(tmp_path: Path, tiny_onnx: Path) -> None:
    data = TEST_DATA / "isic"
    base = dict(data=str(data), arch="resnet18", img_size=32, epochs=1, batch_size=4, val_frac=0.25,
                test_frac=0.2, progress=False, load_workers=1, seed=7)  # fmt: skip
    run(load_config(None, {**base, "out": str(tmp_path / "teacher")}))
    teacher_pt = tmp_path / "teacher" / "best.pt"
    classes = load_checkpoint(teacher_pt).classes
    paths = load_labelled(str(data)).paths
    teachers = load_teachers([str(teacher_pt)], paths, classes, torch.device("cpu"))
    assert teachers[0].logp.shape == (len(paths), len(classes))
    torch.testing.assert_close(teachers[0].logp.exp().sum(1), torch.ones(len(paths)))
    out = tmp_path / "student"
    run(load_config(None, {**base, "out": str(out), "teacher": [str(teacher_pt)], "kd_alpha": 0.7}))
    assert load_checkpoint(out / "best.pt").config["teacher"] == [str(teacher_pt)]
    # An exported model as a teacher: its own input size and preprocessing, read from its metadata.
    onnx_teacher = make_tiny_onnx(tmp_path / "teacher.onnx", size=24, classes=list(reversed(classes)))
    (t,) = load_teachers([str(onnx_teacher)], paths, classes, torch.device("cpu"))
    assert t.index.tolist() == [1, 0] and t.logp.shape == (len(paths), 2)
    assert not torch.allclose(t.logp[0], t.logp[-1])  # a real function of each image
    # The contract fixture model predicts the 7 HAM classes; this data set has only ISIC's two.
    with pytest.raises(ValueError, match="not among the student's"):
        load_teachers([str(tiny_onnx)], paths, classes, torch.device("cpu"))
    with pytest.raises(ValueError, match="no such file"):
        load_teachers([str(tmp_path / "nope.onnx")], paths, classes, torch.device("cpu"))
