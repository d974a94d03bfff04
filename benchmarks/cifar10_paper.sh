#!/usr/bin/env bash
# The paper's CIFAR-10 protocol (Ho et al. 2020, Table 1 and 2): train the cifar10 preset with the
# paper's recipe, sample 50,000 images data-parallel with the ancestral sampler over all T = 1000
# steps, and report FID and IS against the CIFAR-10 training set and the bound in bits/dim on the
# test set, beside the paper's figures (FID 3.17, IS 9.46, NLL <= 3.75 bits/dim).
#
#   DATA_ROOT=/data/cifar10 NPROC=8 bash benchmarks/cifar10_paper.sh
#   DATA_ROOT=/data/cifar10 NPROC=8 INCEPTION_WEIGHTS=pt_inception-2015-12-05-6726825d.pth bash benchmarks/cifar10_paper.sh
#
# DATA_ROOT holds cifar-10-batches-bin/ (the binary version). Each stage is skipped when its output
# exists, so a stopped run continues where it was (training resumes from its newest checkpoint).
# The Inception Score needs the full 2015 Inception network (INCEPTION_WEIGHTS); without it the
# script reports FID and bits/dim and says which file IS needs.
#
# Knobs for a smaller budget (the defaults are the paper's):
#   STEPS (800000)  SAMPLES (50000)  SAMPLE_STEPS (all T)  BPD_N (10000 test images)
#   REF_N (the whole training split)  BATCH (128 / NPROC per process)  TRAIN_ARGS (extra ddpm train options)
#   OUT (runs/cifar10-paper)  PYTHON (.venv/bin/python)  DEVICE (auto)
set -euo pipefail
cd "$(dirname "$0")/.."

: "${DATA_ROOT:?set DATA_ROOT to the folder holding cifar-10-batches-bin/}"
PYTHON="${PYTHON:-.venv/bin/python}"
NPROC="${NPROC:-8}"
OUT="${OUT:-runs/cifar10-paper}"
SAMPLES="${SAMPLES:-50000}"
BPD_N="${BPD_N:-10000}"
DEVICE="${DEVICE:-auto}"
BATCH="${BATCH:-$((128 / NPROC))}"
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
read -r -a train_args <<< "${TRAIN_ARGS:-}"
steps_args=(); [ -n "${STEPS:-}" ] && steps_args=(--steps "$STEPS")
sample_args=(--sampler ddpm); [ -n "${SAMPLE_STEPS:-}" ] && sample_args+=(--steps "$SAMPLE_STEPS")
ref_args=(); [ -n "${REF_N:-}" ] && ref_args=(--ref-n "$REF_N")
mkdir -p "$OUT"

echo "cifar10_paper: 1/4 training the cifar10 preset ($NPROC processes x batch $BATCH) in $OUT/train"
if [ -f "$OUT/train/config.json" ]; then
    "${TORCHRUN[@]}" -m ddpm train --resume "$OUT/train" "${steps_args[@]}" --quiet
else
    "${TORCHRUN[@]}" -m ddpm train --preset cifar10 --data cifar10 --data-root "$DATA_ROOT" --batch-size "$BATCH" \
        --device "$DEVICE" "${steps_args[@]}" "${train_args[@]}" --out "$OUT/train" --quiet
fi

echo "cifar10_paper: 2/4 sampling $SAMPLES images data-parallel (${sample_args[*]}) in $OUT/samples"
if [ ! -f "$OUT/samples/samples.npz" ]; then
    "${TORCHRUN[@]}" -m ddpm sample --checkpoint "$OUT/train" --num-images "$SAMPLES" "${sample_args[@]}" \
        --device "$DEVICE" --batch-size 256 --out "$OUT/samples" --overwrite --quiet
fi

echo "cifar10_paper: 3/4 FID (and IS) of the samples against the CIFAR-10 training set"
metrics=(--metric fid)
if [ -n "${INCEPTION_WEIGHTS:-}" ]; then
    metrics+=(--metric is --inception-weights "$INCEPTION_WEIGHTS")
else
    echo "cifar10_paper: no IS: it needs INCEPTION_WEIGHTS=pt_inception-2015-12-05-6726825d.pth (the full 2015 Inception network)"
fi
"$PYTHON" -m ddpm eval "${metrics[@]}" --samples "$OUT/samples/samples.npz" --n "$SAMPLES" --data cifar10 \
    --data-root "$DATA_ROOT" --split train "${ref_args[@]}" --device "$DEVICE" --out "$OUT/quality.json" --quiet

echo "cifar10_paper: 4/4 the bound in bits/dim on $BPD_N test images"
"$PYTHON" -m ddpm eval --metric bpd --checkpoint "$OUT/train" --n "$BPD_N" --data cifar10 --data-root "$DATA_ROOT" \
    --split test --device "$DEVICE" --batch-size 256 --out "$OUT/bpd.json" --quiet

"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
quality, bpd = (json.loads((out / name).read_text()) for name in ("quality.json", "bpd.json"))
rows = [("FID (train set)", quality.get("fid"), "3.17"),
        ("IS (10 splits)", quality.get("is"), "9.46"),
        ("NLL bits/dim (test, bound)", bpd.get("bpd"), "<= 3.75")]
print(f"\n| metric | this run ({quality['n_samples']} samples, {bpd['bpd_n']} test images) | Ho et al. 2020 |")
print("|---|---|---|")
for name, value, paper in rows:
    shown = "-" if value is None else f"{value:.2f}"
    if name.startswith("IS") and value is not None:
        shown += f" +- {quality['is_std']:.2f}"
    print(f"| {name} | {shown} | {paper} |")
(out / "summary.json").write_text(json.dumps({"fid": quality.get("fid"), "is": quality.get("is"),
                                              "is_std": quality.get("is_std"), "bpd": bpd.get("bpd"),
                                              "n_samples": quality["n_samples"], "bpd_n": bpd["bpd_n"]}, indent=2))
print(f"wrote {out / 'summary.json'}")
EOF
