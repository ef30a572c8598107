#!/usr/bin/env bash
# Builds models/reference.onnx, its INT8 form models/reference-int8.onnx and their model cards from the
# committed ensemble members (models/members/, listed in its manifest.json) with this repository's own
# pipeline: choose members -> export (TTA + temperatures inside) -> threshold on validation -> held-out
# evaluation of the exported file -> INT8 (calibrated on validation images) and its held-out evaluation.
# Nothing is retrained: members come from `python -m train.trip` (a lent GPU, docs/gpu.md) or from
# `python -m train`, added with `python -m train.members add` (docs/training.md, "Members").
#
#   bash models/build_reference.sh [DATA_DIR] [RUN_DIR]
#
# DATA_DIR defaults to ../shared/data/ham10000 (HAM10000_metadata.csv + images). SERVE names the members
# to serve (default: the set chosen on validation by `python -m train.ensemble`, docs/training.md);
# TTA the test-time views (none, flips, dihedral). Every member must have been trained on the split
# models/reference-eval/split.json (the manifest's split_sha256): its test part is held out for all of them.
# EXTERNAL (default ../shared/data/isic-archive-cc0) is the external melanoma/nevus check written into the card.
# OUT (default models/) takes the files, cards and evaluations; SPLIT (default models/reference-eval/split.json)
# the members' split; MEMBERS_DIR their folder; INT8=0 skips the INT8 form (the GPU trip's CPU dry run uses these).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/ham10000}
RUN=${2:-runs/reference}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-models}
MODEL=$OUT/reference.onnx
MODEL_INT8=$OUT/reference-int8.onnx
EVAL=$OUT/reference-eval
EVAL_INT8=$OUT/reference-int8-eval
MEMBERS_DIR=${MEMBERS_DIR:-models/members}
SPLIT=${SPLIT:-models/reference-eval/split.json}
INT8=${INT8:-1}
VERSION=${VERSION:-3.0.0}
SERVE=${SERVE:-"lite2-260-f1-s0 lite1-240-f2-s0 lite0-224-f4-s2"}
TTA=${TTA:-none}
TARGET_SENSITIVITY=${TARGET_SENSITIVITY:-0.95}
EXTERNAL=${EXTERNAL:-../shared/data/isic-archive-cc0}
mkdir -p "$RUN"

# 1. The members: each must be listed in the manifest and trained on $SPLIT (checked by its sha256).
CKPTS=()
for name in $SERVE; do CKPTS+=("$MEMBERS_DIR/$name.pt"); done
"$PY" - "$MEMBERS_DIR" "$SPLIT" $SERVE <<'PY'
import hashlib
import sys
from pathlib import Path

from train.members import read_manifest

folder, split, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
man = read_manifest(folder)
listed = {m["name"]: m for m in man.members}
missing = [n for n in names if n not in listed]
if missing:
    sys.exit(f"build_reference: {', '.join(missing)} not in {folder}/manifest.json (python -m train.members list)")
sha = hashlib.sha256(split.read_bytes()).hexdigest()
if man.data.get("split_sha256") != sha:
    sys.exit(f"build_reference: the members were trained on another split than {split}: its test part would leak")
print(f"serving {len(names)} of {len(listed)} members: {', '.join(names)}")
PY
cp "$SPLIT" "$RUN/split.json"

# 2. Export once to measure the file on validation and choose the malignancy threshold there
#    (never on test), then export again with that threshold in the metadata.
"$PY" -m export "${CKPTS[@]}" --out "$RUN/tmp.onnx" --tta "$TTA" --name reference --version "$VERSION" --no-cam
THRESHOLD=$("$PY" - "$RUN" "$DATA" "$TARGET_SENSITIVITY" <<'PY'
import sys
from pathlib import Path

import numpy as np

from export.evaluate import choose_threshold, malignancy_scores, onnx_probabilities, select
from export.metadata import read_metadata
from train.data import load_images, load_labelled

run, data, target = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
meta = read_metadata(run / "tmp.onnx")
val = select(load_labelled(data, None, meta.classes), run / "split.json", "val")
probs = onnx_probabilities(run / "tmp.onnx", load_images(val.paths, meta.input_size))
positive = np.isin(np.asarray(val.labels), [meta.classes.index(c) for c in meta.malignant_classes])
print(f"{choose_threshold(malignancy_scores(probs, meta.classes, meta.malignant_classes), positive, target):.4f}")
PY
)
echo "malignancy threshold for sensitivity >= $TARGET_SENSITIVITY on validation: $THRESHOLD"
# The file also carries the out-of-distribution score (fitted on the training part, threshold on
# validation) and the class activation map (docs/export.md).
"$PY" -m export "${CKPTS[@]}" --out "$MODEL" --tta "$TTA" --name reference --version "$VERSION" \
  --malignancy-threshold "$THRESHOLD" --ood-data "$DATA" --ood-split "$RUN/split.json"
rm -f "$RUN/tmp.onnx" "$RUN/tmp.md"

# 3. Measure the exported file on the held-out test lesions; write the card's evaluation
#    section and its plots ($EVAL/).
"$PY" -m export.evaluate "$MODEL" --data "$DATA" --split "$RUN/split.json" --part test \
  --out "$EVAL" --card "$OUT/reference.md"
# The manifest as it stood, with the members this file serves and its TTA (tests/models/test_reference.py reads it).
"$PY" - "$MEMBERS_DIR/manifest.json" "$EVAL/members.json" "$TTA" $SERVE <<'PY'
import json
import sys

manifest = json.load(open(sys.argv[1]))
manifest["served"] = {"members": sys.argv[4:], "tta": sys.argv[3]}
with open(sys.argv[2], "w") as f:
    f.write(json.dumps(manifest, indent=2) + "\n")
PY
# Out-of-distribution check: held-out HAM10000 test images vs the packaged OOD set (docs/export.md).
"$PY" -m export.ood_eval "$MODEL" --data "$DATA" --split "$RUN/split.json" --part test \
  --out "$EVAL" --card "$OUT/reference.md"
if [ -d "$EXTERNAL" ]; then
  "$PY" -m export.external "$MODEL" --data "$EXTERNAL" --out "$EVAL" --card "$OUT/reference.md"
fi

# 4. INT8 for CPU-only servers (docs/export.md, "INT8"): calibrated on validation images, verified
#    against the float file on the rest of validation (the export fails past its limits), then
#    measured on the same held-out test lesions.
#    INT8=0 skips it (the CPU dry run of the GPU trip, tests/train/test_trip.py: tiny members miss its limits).
if [ "$INT8" != 0 ]; then
  "$PY" -m export.quantize "$MODEL" --out "$MODEL_INT8" --calibration "$DATA" --calibration-split "$RUN/split.json" --part val
  # quantize refits the OOD threshold on INT8 scores of plain validation images; choose it as the fp32
  # export did, over validation images and their acquisition-shifted copies (export/acquisition.py).
  "$PY" -m export.ood_refit "$MODEL_INT8" --data "$DATA" --split "$RUN/split.json"
  "$PY" -m export.evaluate "$MODEL_INT8" --data "$DATA" --split "$RUN/split.json" --part test \
    --out "$EVAL_INT8" --card "$OUT/reference-int8.md"
  "$PY" -m export.ood_eval "$MODEL_INT8" --data "$DATA" --split "$RUN/split.json" --part test \
    --out "$EVAL_INT8" --card "$OUT/reference-int8.md"
  if [ -d "$EXTERNAL" ]; then
    "$PY" -m export.external "$MODEL_INT8" --data "$EXTERNAL" --out "$EVAL_INT8" --card "$OUT/reference-int8.md"
  fi
fi

# 5. The card's "How it was made" section: the exact commands and the members' own figures.
"$PY" - "$MEMBERS_DIR" "$DATA" "$THRESHOLD" "$TARGET_SENSITIVITY" "$TTA" "$VERSION" $SERVE >> "$OUT/reference.md" <<'PY'
import sys
from pathlib import Path

from train.members import read_manifest

folder, data, threshold, target, tta, version = Path(sys.argv[1]), *sys.argv[2:7]
names = sys.argv[7:]
members = {m["name"]: m for m in read_manifest(folder).members}
rows = []
for n in names:
    m = members[n]
    fh, va = m["metrics"]["fold_holdout"], m["metrics"]["val"]
    rows.append(
        f"| `{n}` | {m['arch']} | {m['img_size']} | {m['fold']} of {m['folds']} | {m['seed']} | {m['trained_on']} |"
        f" {m['best_epoch']}/{m['epochs_trained']} | {m['train_seconds']:.0f} s | {fh['balanced_accuracy']:.3f} |"
        f" {va['balanced_accuracy']:.3f} | {m['temperature']:.2f} |"
    )
serve = " ".join(names)
print(f"""
## How it was made

Built by this repository's own pipeline from committed ensemble members (`models/members/`, listed with
their recipe and figures in `models/members/manifest.json`; nothing retrained):
`SERVE="{serve}" TTA={tta} bash models/build_reference.sh {data}` runs

```
python -m export {" ".join(f"models/members/{n}.pt" for n in names)} \\
  --out models/reference.onnx --tta {tta} --name reference --version {version} \\
  --malignancy-threshold {threshold} --ood-data {data} --ood-split models/reference-eval/split.json
python -m export.evaluate models/reference.onnx --data {data} --split models/reference-eval/split.json --part test \\
  --out models/reference-eval --card models/reference.md
```

Split: HAM10000 grouped by `lesion_id` (no lesion on two sides), stratified by class, 70/15/15
train/validation/test ([reference-eval/split.json](reference-eval/split.json), the split of references 1 and 2).
Each member trained on 4 of 5 lesion-grouped folds of the training part and chose its best epoch and
temperature on the fifth (its "fold" figures below); which members to serve and the malignancy threshold
{threshold} (the highest reaching sensitivity >= {target} on validation) were chosen on the validation part;
the test part decided nothing. Members (single view, PyTorch):

| member | architecture | px | fold | seed | trained on | best/trained epochs | time | fold bal. acc. | val bal. acc. | T |
|---|---|---:|---|---:|---|---|---:|---:|---:|---:|
""" + "\n".join(rows))
PY
