#!/usr/bin/env bash
# Issue 9's scaling table on one multi-GPU host: one torchrun launch per ITEM, the table last.
#
#   bench/run_scaling.sh [ITEM ...]      ITEM = MODE:GPUS[:sharded][@SECONDS]
# MODE is data or expert (bench/scaling.py --mode). Run the 1-GPU data row first: the others'
# efficiency is measured against it. Default: data:1 data:2 expert:2 data:2:sharded.
# A CPU dry run of the harness: PY=/work/venv/bin/python BENCH_ARGS=--tiny bench/run_scaling.sh
set -u
source "$(dirname "$0")/gpu_env.sh"
read -r -a BENCH_ARGS <<<"${BENCH_ARGS:-}"
nvidia-smi topo -m | tee -a "$OUT/device.txt"
ITEMS=("$@")
[ ${#ITEMS[@]} -eq 0 ] && ITEMS=(data:1@150 data:2@130 expert:2@130 data:2:sharded@130)
for spec in "${ITEMS[@]}"; do
  item=${spec%@*}
  limit=150
  [ "$item" != "$spec" ] && limit=${spec##*@}
  IFS=: read -r mode gpus sharded <<<"$item"
  extra=()
  [ "${sharded:-}" = sharded ] && extra=(--sharded)
  log="$OUT/log_${mode}_${gpus}${sharded:+_$sharded}.txt"
  echo "=== $item ($(date -u +%H:%M:%S))"
  run_item "$limit" "$log" "$PY" -m torch.distributed.run --standalone --nproc-per-node "$gpus" -m bench.scaling \
    --mode "$mode" "${extra[@]}" --out "$OUT" "${BENCH_ARGS[@]}"
done
save_inductor_cache
"$PY" bench/common.py table "$OUT"
