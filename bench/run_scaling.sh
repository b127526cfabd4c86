#!/usr/bin/env bash
# Issue 9's scaling table on one multi-GPU host: one torchrun launch per ITEM, the table last.
#
#   bench/run_scaling.sh [ITEM ...]      ITEM = MODE:GPUS[:FLAG...][@SECONDS]
# MODE is data or expert (bench/scaling.py --mode). FLAG: sharded (FSDP2 base), spN (sequence-parallel
# over N GPUs per replica), FxHxW (the clip, e.g. 81x1024x1024), full (full checkpointing), offload
# (activation offloading). Run the 1-GPU data row of a clip first: the others' efficiency is measured
# against it. Default: data:1 data:2 expert:2 data:2:sharded.
# Issue 21's SP table (three calls on an 8-GPU kind) is in bench/RESULTS.md, "sequence parallelism";
# e.g. data:8:sp8:81x1024x1024@120 is 8 GPUs sharing each 81f@1024² clip.
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
  IFS=: read -r mode gpus flags <<<"$item"
  extra=()
  for flag in ${flags//:/ }; do
    case "$flag" in
      sharded) extra+=(--sharded) ;;
      sp*) extra+=(--sp "${flag#sp}") ;;
      full) extra+=(--checkpointing full) ;;
      offload) extra+=(--offload) ;;
      *x*x*) extra+=(--shape "$flag") ;;
      *) echo "unknown flag $flag in $spec"; exit 2 ;;
    esac
  done
  log="$OUT/log_${mode}_${gpus}${flags:+_${flags//:/_}}.txt"
  echo "=== $item ($(date -u +%H:%M:%S))"
  run_item "$limit" "$log" "$PY" -m torch.distributed.run --standalone --nproc-per-node "$gpus" -m bench.scaling \
    --mode "$mode" "${extra[@]}" --out "$OUT" "${BENCH_ARGS[@]}"
done
save_inductor_cache
"$PY" bench/common.py table "$OUT"
