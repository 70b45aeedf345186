#!/usr/bin/env bash
# The demo chain of CONTRACT.md on the shipped NYC data, on CPU: prepare -> baselines -> train (DeepSpeed,
# 2 CPU ranks, ZeRO-2, experts split over the 2 ranks) -> evaluate -> export (ONNX) -> bench.
# Everything goes under demo-out/. Run through `make demo` (which sets up .venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA_ROOT=${NEXTLOCMOE_DATA:-../shared/data}
OUT=demo-out
STEPS=${DEMO_STEPS:-600}
EVAL_N=${DEMO_EVAL_SAMPLES:-0}  # 0 = the whole test split (about 40 s on 2 cores)
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
t0=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

stage "1/6 prepare fsq-nyc -> $OUT/data"
$BIN/nextlocmoe prepare --dataset fsq-nyc --source "$DATA_ROOT/fsq-nyc" --out "$OUT/data"

stage "2/6 baselines on the test split"
$BIN/nextlocmoe evaluate --baselines-only --data "$OUT/data" --split test --quiet --out "$OUT/data/baselines_test.json"

stage "3/6 train: debug flavour, DeepSpeed ZeRO-2, 2 CPU ranks, ep_size=2, $STEPS steps"
rm -rf "$OUT/run"
$BIN/python -m torch.distributed.run --standalone --nproc_per_node 2 train/train.py \
  --config configs/debug.yaml --deepspeed ds_configs/zero2.json --no-eval \
  train.ep_size=2 train.zero_stage=2 train.steps="$STEPS" train.out_dir="$OUT" train.name=run \
  data.dir="$OUT/data" train.max_eval_samples="$EVAL_N"

stage "4/6 evaluate the run on the test split (baselines on the same samples)"
$BIN/nextlocmoe evaluate --run "$OUT/run" --max-samples "$EVAL_N" --quiet --out "$OUT/run/eval.json"

if [ -f export/export.py ]; then
  stage "5/6 export: freeze routing -> ONNX (+ TensorRT where installed)"
  $BIN/python export/export.py --run "$OUT/run" --out "$OUT/engines" --format onnx,tensorrt
  stage "6/6 bench: same inputs on every backend"
  $BIN/python export/bench.py --engines "$OUT/engines" --backends torch,onnxruntime,tensorrt \
    --batch-sizes 1,8,64 --out "$OUT/bench.json" --plot "$OUT/bench.png" --load-clients 4 --load-seconds 5
fi

stage "done"
echo "outputs:"
echo "  $OUT/data/manifest.json         prepared data + row accounting"
echo "  $OUT/data/baselines_test.json   baselines"
echo "  $OUT/run/                       config.yaml, metrics.jsonl, checkpoints/, eval.json"
[ -d "$OUT/engines" ] && echo "  $OUT/engines/                   model.onnx, export_report.json, serving.json, venues.npz" \
  && echo "  serve it: $BIN/nextlocmoe predict --engine $OUT/engines --records FILE.csv  (docs/SERVING.md)"
[ -f "$OUT/bench.json" ] && echo "  $OUT/bench.json, $OUT/bench.png  latency table and plot"
exit 0
