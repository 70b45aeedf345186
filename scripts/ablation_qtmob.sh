#!/usr/bin/env bash
# QT-Mob ablation (docs/QTMOB.md): coordinate/scored head alone vs + semantic tokens vs + code-generation
# ranking, and mobility recovery, on fsq-nyc and llmmob-fsq-nyc test splits; baselines on the same samples.
# Each variant: debug flavour, DeepSpeed ZeRO-2, 2 CPU ranks, ep_size 2, STEPS steps, same seed.
#   bash scripts/ablation_qtmob.sh            (about 35 min on 2 cores; outputs under ablation-out/)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA_ROOT=${NEXTLOCMOE_DATA:-../shared/data}
OUT=${ABLATION_OUT:-ablation-out}
STEPS=${ABLATION_STEPS:-1000}
N=${ABLATION_SAMPLES:-3000}  # evenly spaced test samples, the same for every model and baseline
DATASETS=${ABLATION_DATASETS:-"fsq-nyc llmmob-fsq-nyc"}
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

declare -A VARIANT=(
  [coord]=""
  [tokens]="model.tokens.enabled=true"
  [codes]="model.tokens.enabled=true model.tokens.gen_head=true"
  [recovery]="model.tokens.enabled=true model.tokens.recovery=true loss.recovery_weight=1.0"
)
for ds in $DATASETS; do
  data="$OUT/$ds/data"
  [ -f "$data/manifest.json" ] || $BIN/nextlocmoe prepare --dataset "$ds" --source "$DATA_ROOT/$ds" --out "$data"
  [ -f "$data/location_codes.json" ] || $BIN/nextlocmoe tokenize --data "$data"
  for v in coord tokens codes recovery; do
    run="$OUT/$ds/$v"
    if [ ! -f "$run/eval_next.json" ]; then
      rm -rf "$run"
      # shellcheck disable=SC2086
      $BIN/python -m torch.distributed.run --standalone --nproc_per_node 2 train/train.py \
        --config configs/debug.yaml --deepspeed ds_configs/zero2.json --no-eval train.ep_size=2 \
        train.steps="$STEPS" train.out_dir="$OUT/$ds" train.name="$v" data.dir="$data" ${VARIANT[$v]} 2>&1 \
        | tr '\r' '\n' | grep -v "^train: *[0-9]" || true
      $BIN/nextlocmoe evaluate --run "$run" --max-samples "$N" --quiet --out "$run/eval_next.json"
    fi
    if [ "$v" = recovery ] || [ "$v" = coord ]; then
      [ -f "$run/eval_recovery.json" ] || $BIN/nextlocmoe evaluate --run "$run" --task recovery \
        --max-samples "$N" --quiet --out "$run/eval_recovery.json"
    fi
  done
done
$BIN/python scripts/ablation_table.py "$OUT" $DATASETS
