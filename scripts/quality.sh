#!/usr/bin/env bash
# The quality recipe (docs/MODEL_QUALITY.md): prepare -> train configs/quality.yaml with DeepSpeed on 2 CPU
# ranks (ZeRO-2, ep_size 2) -> evaluate on the whole test split (every baseline on the same samples).
#   bash scripts/quality.sh [fsq-nyc|llmmob-fsq-nyc] [section.key=value ...]
# Extra overrides go to train.py (e.g. train.name=nosem model.semantic_moe.enabled=false for an ablation).
# Writes $QUALITY_OUT/<dataset>/data/ and $QUALITY_OUT/<dataset>/<train.name>/ (config.yaml, metrics.jsonl,
# checkpoints/, eval.json). Run after `make setup`. About 10-15 minutes on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATASET=${1:-fsq-nyc}
shift || true
case "$DATASET" in fsq-nyc|llmmob-fsq-nyc) ;; *) echo "quality.sh: dataset must be fsq-nyc or llmmob-fsq-nyc, got '$DATASET'" >&2; exit 2;; esac
DATA_ROOT=${NEXTLOCMOE_DATA:-../shared/data}
OUT=${QUALITY_OUT:-quality-out}/$DATASET
NAME=quality
for kv in "$@"; do case "$kv" in train.name=*) NAME=${kv#train.name=};; esac; done
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
t0=$(date +%s)
if [ ! -f "$OUT/data/manifest.json" ]; then
  $BIN/nextlocmoe prepare --dataset "$DATASET" --source "$DATA_ROOT/$DATASET" --out "$OUT/data"
fi
rm -rf "${OUT:?}/$NAME"
$BIN/python -m torch.distributed.run --standalone --nproc_per_node 2 train/train.py \
  --config configs/quality.yaml --deepspeed ds_configs/zero2.json --no-eval \
  train.out_dir="$OUT" data.dir="$OUT/data" "$@"
t1=$(date +%s)
$BIN/nextlocmoe evaluate --run "$OUT/$NAME" --quiet --out "$OUT/$NAME/eval.json"
t2=$(date +%s)
echo "quality $DATASET/$NAME: train $((t1 - t0)) s, evaluate $((t2 - t1)) s -> $OUT/$NAME/eval.json"
$BIN/python scripts/eval_table.py "$OUT/$NAME/eval.json"
