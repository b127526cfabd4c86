#!/usr/bin/env bash
# All GPU benchmark configurations of issue 7, one process each, logs under $OUT, the table last.
#
#   bench/run_gpu.sh [ITEM ...]
# ITEM is a bench/train_step.py configuration (`python -m bench.train_step --list`),
# naive:FRAMES:HEIGHT:WIDTH[:VARIANT] for the hand-wired diffusers+peft baseline (VARIANT: i2v-a14b, ti2v-5b), peer:FRAMES:HEIGHT:WIDTH for
# DiffSynth-Studio's Wan model (bench/peer_diffsynth.py), `smoke` (bench/gpu_smoke.py) or `fp8attn`
# (bench/fp8_attention.py, kernel-level FP8 attention numerics and speed); append +profile to also
# write a torch.profiler summary of one step, and @SECONDS to give it its own time limit (default
# $PER_ITEM_TIMEOUT). Budget for compilation: the first step of a new clip shape or base type
# compiles for 25-70 s on an H100. With no ITEM, the default list below runs (~14 min: two calls).
#
# On the device machine (setup in bench/gpu_env.sh): wheels of packages its image lacks travel in
# .whl/ (carry it); compiled kernels travel in .cache/inductor.tgz when an earlier call brought them
# back (carry .cache), which saves ~1 min of compilation per clip shape.
set -u
source "$(dirname "$0")/gpu_env.sh"
PER_ITEM_TIMEOUT=${PER_ITEM_TIMEOUT:-300}
read -r -a BENCH_ARGS <<<"${BENCH_ARGS:-}"

ITEMS=("$@")
if [ ${#ITEMS[@]} -eq 0 ]; then
  ITEMS=(naive:33:512:512@60 ours_33f_1expert+profile@110 33f_bf16_both_sw1@90 81f_bf16_1expert+profile@170
         33f_float8_1expert_fullckpt@100 33f_uint4_1expert_fullckpt@110 quant_cache_float8@90
         33f_bf16_sw10_host@150 81f_1024_float8_fullckpt@240)
fi

for spec in "${ITEMS[@]}"; do
  item=${spec%@*}
  limit=$PER_ITEM_TIMEOUT
  [ "$item" != "$spec" ] && limit=${spec##*@}
  name=${item%+profile}
  extra=()
  [ "$name" != "$item" ] && extra=(--profile)
  echo "=== $item ($(date -u +%H:%M:%S))"
  if [[ $name == smoke ]]; then
    cmd=("$PY" bench/gpu_smoke.py)
    log="$OUT/log_smoke.txt"
  elif [[ $name == fp8attn ]]; then
    cmd=("$PY" -m bench.fp8_attention --out "$OUT")
    log="$OUT/log_fp8attn.txt"
  elif [[ $name == peer:* ]]; then
    IFS=: read -r _ f h w <<<"$name"
    cmd=("$PY" -m bench.peer_diffsynth --frames "$f" --height "$h" --width "$w" --out "$OUT" "${extra[@]}" "${BENCH_ARGS[@]}")
    log="$OUT/log_peer_${f}f_${w}x${h}.txt"
  elif [[ $name == naive:* ]]; then
    IFS=: read -r _ f h w v <<<"$name"
    cmd=("$PY" -m bench.baseline_naive --frames "$f" --height "$h" --width "$w" --variant "${v:-t2v-a14b}" --out "$OUT" "${extra[@]}" "${BENCH_ARGS[@]}")
    log="$OUT/log_naive_${f}f_${w}x${h}${v:+_$v}.txt"
  else
    cmd=("$PY" -m bench.train_step "$name" --out "$OUT" "${extra[@]}" "${BENCH_ARGS[@]}")
    log="$OUT/log_${name}.txt"
  fi
  run_item "$limit" "$log" "${cmd[@]}"
done

save_inductor_cache
cat "$OUT"/profile_*.md 2>/dev/null | head -60
"$PY" bench/common.py table "$OUT"
