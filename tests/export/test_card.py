"""The model card is rendered from the metadata: every fact it states comes from there."""

from __future__ import annotations

from export.card import render_card
from export.parity import Check
from service.contract import ModelMetadata
from tests.tiny_model import HAM_CLASSES


def meta(**metrics: object) -> ModelMetadata:
    return ModelMetadata(
        classes=["mel", "nv"],
        input_size=64,
        name="card-test",
        version="9.9",
        class_names={"mel": "Melanoma", "nv": "Melanocytic nevus"},
        malignant_classes=["mel"],
        malignancy_threshold=0.35,
        tta=["identity", "hflip"],
        temperature=[1.25],
        architecture=["resnet50"],
        training_data={"name": "HAM10000", "license": "CC BY-NC 4.0", "citation": "Tschandl et al. 2018"},
        metrics=dict(metrics),
        weights_sha256="f" * 64,
    )


def test_card_states_the_metadata_facts() -> None:
    card = render_card(
        meta(
            balanced_accuracy=0.71, per_class={"mel": {"recall": 0.5, "support": 4}}, confusion_matrix=[[2, 2], [1, 9]]
        ),
        [Check("batch of 8 vs 8 singles", 0.0, 1e-5, True)],
        file_name="card-test.onnx",
        size_bytes=2_500_000,
        opset=18,
    )
    for fact in ("card-test 9.9", "2.5 MB", "opset 18", "| 0 | `mel` | Melanoma | yes |", "threshold 0.35",
                 "uint8 `[N, 64, 64, 3]`", "identity, hflip", "resnet50 (T=1.25)", "CC BY-NC 4.0", "Tschandl et al. 2018",
                 "`balanced_accuracy`: 0.7100", "| `mel` | 0.500 | 4 |", "| `nv` | 1 | 9 |",
                 "batch of 8 vs 8 singles: 0 (tolerance 1e-05) ok", "f" * 64):  # fmt: skip
        assert fact in card, fact
    assert HAM_CLASSES[0] not in card  # only this model's classes


def test_card_without_metrics_says_so() -> None:
    card = render_card(meta(), [], file_name="x.onnx", size_bytes=1, opset=18)
    assert "No validation metrics were stored" in card


def test_ensemble_card_has_one_row_per_member() -> None:
    members = [
        {"balanced_accuracy": 0.7, "auc_macro": 0.93, "n": 140, "per_class": {"mel": {"recall": 0.5}}},
        {"balanced_accuracy": 0.75, "auc_macro": 0.94, "n": 141},
    ]
    m = meta(members=members, mean_of_members={"balanced_accuracy": 0.725})
    card = render_card(m, [], file_name="x.onnx", size_bytes=1, opset=18)
    assert "`balanced_accuracy`: 0.7250" in card
    assert "| member | `balanced_accuracy` | `auc_macro` | `n` |" in card
    assert "| 1 | 0.7000 | 0.9300 | 140 |" in card and "| 2 | 0.7500 | 0.9400 | 141 |" in card
    assert "per_class" not in card  # tables of each member stay in the metadata, not dumped into the card
