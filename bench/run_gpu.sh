#!/usr/bin/env bash
# All GPU benchmark configurations of issue 7, one process each, logs under $OUT, the table last.
#
#   bench/run_gpu.sh [ITEM ...]
# ITEM is a bench/train_step.py configuration (`python -m bench.train_step --list`) or
# naive:FRAMES:HEIGHT:WIDTH for the hand-wired diffusers+peft baseline; append +profile to also
# write a torch.profiler summary of one step, and @SECONDS to give it its own time limit (default
# $PER_ITEM_TIMEOUT). Budget for compilation: the first step of a new clip shape or base type
# compiles for 25-70 s on an H100. With no ITEM, the default list below runs (~14 min: two calls).
#
# On the device machine: wheels of packages its image lacks travel in .whl/ (carry it); compiled
# kernels travel in .cache/inductor.tgz when an earlier call brought them back (carry .cache),
# which saves ~1 min of compilation per clip shape.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if [ -z "${PY:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
PER_ITEM_TIMEOUT=${PER_ITEM_TIMEOUT:-300}
PY=${PY:-python3}              # a dry run here: PY=/work/venv/bin/python BENCH_ARGS=--tiny
read -r -a BENCH_ARGS <<<"${BENCH_ARGS:-}"
if [ -f .cache/inductor.tgz ]; then mkdir -p /tmp/inductor && tar xzf .cache/inductor.tgz -C /tmp; fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
"$PY" -c "import torch, diffusers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"

"$PY" -c "import bench.train_step, bench.baseline_naive, wanlora.models.quant" || { echo "imports fail: carry the missing wheels"; exit 1; }

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
  if [[ $name == naive:* ]]; then
    IFS=: read -r _ f h w <<<"$name"
    cmd=("$PY" -m bench.baseline_naive --frames "$f" --height "$h" --width "$w" --out "$OUT" "${extra[@]}" "${BENCH_ARGS[@]}")
    log="$OUT/log_naive_${f}f_${w}x${h}.txt"
  else
    cmd=("$PY" -m bench.train_step "$name" --out "$OUT" "${extra[@]}" "${BENCH_ARGS[@]}")
    log="$OUT/log_${name}.txt"
  fi
  timeout "$limit" "${cmd[@]}" >"$log" 2>&1
  rc=$?
  grep -E "built in|step [0-9]+:|ROW|Error" "$log" | cut -c1-300 | tail -12
  [ $rc -ne 0 ] && echo "!!! $item exited $rc" && tail -5 "$log"
  # one archive of logs, appended as we go: the tool brings back at most 8 files, even after a timeout
  tar rf "$OUT/logs.tar" -C "$OUT" "$(basename "$log")" && rm -f "$log"
done

# compiled kernels for the next call
tar czf "$OUT/inductor.tgz" -C /tmp inductor 2>/dev/null
[ "$(stat -c %s "$OUT/inductor.tgz")" -gt 15000000 ] && rm -f "$OUT/inductor.tgz" && echo "inductor cache too big to bring back"
cat "$OUT"/profile_*.md 2>/dev/null | head -60
"$PY" bench/common.py table "$OUT"
