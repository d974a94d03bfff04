#!/usr/bin/env bash
# The GPU benchmark in one command, under 8 minutes on one GPU:
#
#   benchmarks/gpu.sh [OUT_DIR]            # on a CUDA machine (default OUT_DIR .bench/gpu)
#   benchmarks/gpu.sh --tiny [OUT_DIR]     # the same steps on the CPU at a tiny size, to know it works
#
# 1. training images/s of the cifar10 preset at batch 128 (benchmarks/speed.py, a subprocess per
#    row, so each row's peak memory is its own): ddpm in fp32 (PyTorch's defaults: TF32
#    convolutions), bf16 and fp16 with channels-last (ddpm's default layout on CUDA), bf16 without
#    it, and bf16 under torch.compile; diffusers' UNet2DModel of the same architecture as a user
#    gets it (fp32) and at its best settings (channels-last, bf16 / fp16, torch.compile for bf16);
# 2. sampling images/s at batch 256, the same precisions;
# 3. a short `ddpm train` on the GPU with the default --precision auto, then a resume of it;
# 4. `ddpm train` under torchrun over every visible GPU (NCCL; one GPU exercises the path);
# 5. a summary against the targets: ddpm >= 1.2x diffusers at equal precision, and >= 2,700
#    training images/s on one GPU (the paper's TPU v3-8: 21 steps/s at batch 128).
#
# Everything goes to OUT_DIR: log.txt (all output), train.json, sample.json, run/ (the resumed
# run), ddp/ and summary.json. The data are random images (the throughput does not depend on
# them), so nothing is downloaded. --tiny uses the digits preset at batch 8, CPU rows only (no
# fp16), torch.compile with the aot_eager backend (the same graph capture, forward and backward,
# without inductor's C++ build, which takes many minutes on 2 busy cores), and two gloo processes
# for the torchrun step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; shift; fi
OUT=${1:-.bench/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

if [ "$TINY" = 1 ]; then
    DEVICE=cpu PRESET=digits TRAIN_BATCH=8 SAMPLE_BATCH=8 STEPS=3 WARMUP=2 MATMUL_S=0.05 BACKEND=aot_eager
    SHAPE="8,8,1" NPROC=2 RUN_STEPS=4 RESUME_STEPS=6 THREADS=1
    export OMP_NUM_THREADS=1
    TRAIN_ROWS="ours-fp32 ours-bf16 ours-bf16-nchw diffusers-fp32 diffusers-bf16-cl ours-bf16-compile diffusers-bf16-cl-compile"
    SAMPLE_ROWS="ours-fp32 ours-bf16 diffusers-fp32 diffusers-bf16-cl"
else
    DEVICE=cuda PRESET=cifar10 TRAIN_BATCH=128 SAMPLE_BATCH=256 STEPS=10 WARMUP=3 MATMUL_S=0.2 BACKEND=inductor
    SHAPE="32,32,3" RUN_STEPS=100 RESUME_STEPS=150 THREADS=4
    NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if [ "$NPROC" -lt 1 ]; then echo "no CUDA device visible; run benchmarks/gpu.sh --tiny for the CPU check"; exit 2; fi
    # Compiled rows last: their compilation is the slowest part.
    TRAIN_ROWS="ours-fp32 ours-bf16 ours-fp16 ours-bf16-nchw diffusers-fp32 diffusers-fp32-cl diffusers-bf16-cl \
diffusers-fp16-cl ours-bf16-compile diffusers-bf16-cl-compile"
    SAMPLE_ROWS="ours-fp32 ours-bf16 ours-fp16 diffusers-fp32 diffusers-bf16-cl diffusers-fp16-cl"
fi
section() { echo; echo "=== $1 (at ${SECONDS} s)"; }

section "machine"
date -u
command -v nvidia-smi >/dev/null && nvidia-smi -L || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers missing: ddpm rows only"

speed=("$PY" benchmarks/speed.py --device "$DEVICE" --presets "$PRESET" --threads "$THREADS"
       --steps "$STEPS" --warmup "$WARMUP" --matmul-seconds "$MATMUL_S" --compile-backend "$BACKEND")
section "1. training images/s, batch $TRAIN_BATCH"
# shellcheck disable=SC2086
"${speed[@]}" --mode train --batch-size "$TRAIN_BATCH" --rows $TRAIN_ROWS --json "$OUT/train.json"

section "2. sampling images/s, batch $SAMPLE_BATCH"
# shellcheck disable=SC2086
"${speed[@]}" --mode sample --batch-size "$SAMPLE_BATCH" --rows $SAMPLE_ROWS --json "$OUT/sample.json"

section "3. ddpm train (--precision auto) and a resume"
"$PY" -c "import numpy as np; shape = tuple(int(s) for s in '$SHAPE'.split(',')); \
np.savez('$OUT/data.npz', images=np.random.default_rng(0).integers(0, 256, (2048, *shape), dtype=np.uint8))"
rm -rf "$OUT/run" "$OUT/ddp"
common=(--preset "$PRESET" --data "$OUT/data.npz" --batch-size "$TRAIN_BATCH" --log-every 10 --num-images 16
        --device "$DEVICE")
"$PY" -m ddpm train "${common[@]}" --steps "$RUN_STEPS" --checkpoint-every "$RUN_STEPS" --out "$OUT/run"
"$PY" -m ddpm train --resume "$OUT/run" --steps "$RESUME_STEPS"

section "4. ddpm train under torchrun, $NPROC process(es)"
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m ddpm train "${common[@]}" \
    --steps "$RUN_STEPS" --checkpoint-every 0 --quiet --out "$OUT/ddp"

section "5. summary"
"$PY" - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {}
for mode in ("train", "sample"):
    rows = json.loads((out / f"{mode}.json").read_text())
    best = {}
    for r in rows:                    # each system's fastest row at each precision
        key = (r["system"], r["precision"])
        if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
            best[key] = r
    for (system, precision), r in sorted(best.items()):
        if system != "ours":
            continue
        peer = best.get(("diffusers", precision))
        ratio = r["images_per_s"] / peer["images_per_s"] if peer else None
        summary[f"{mode} {precision}"] = {"ours": r["row"], "ours_images_per_s": round(r["images_per_s"], 1),
                                          "diffusers": peer and peer["row"],
                                          "diffusers_images_per_s": peer and round(peer["images_per_s"], 1),
                                          "ratio": ratio and round(ratio, 2), "target_1.2x": ratio and ratio >= 1.2}
    if mode == "train":
        fastest = max((r for r in rows if r["system"] == "ours"), key=lambda r: r["images_per_s"])
        summary["train fastest ddpm row"] = {"row": fastest["row"], "images_per_s": round(fastest["images_per_s"], 1),
                                             "target_2700": fastest["images_per_s"] >= 2700}
for run in ("run", "ddp"):
    config = json.loads((out / run / "config.json").read_text())
    rates = [r["images_per_s"] for r in map(json.loads, (out / run / "metrics.jsonl").read_text().splitlines())
             if "images_per_s" in r][1:]                      # the first window includes the start-up
    summary[f"ddpm train ({run})"] = {"precision": config["train"]["precision"],
                                      "images_per_s": round(statistics.median(rates), 1) if rates else None}
print(json.dumps(summary, indent=1))
(out / "summary.json").write_text(json.dumps(summary, indent=1))
EOF
echo "done in ${SECONDS} s; everything is in $OUT"
