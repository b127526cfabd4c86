# Sourced by the bench/run_*.sh scripts: the device machine's environment for our benchmarks.
# Installs the carried wheels (.whl/) the image lacks, unpacks compiled kernels (.cache/inductor.tgz)
# from an earlier call, keeps NVLink multicast off as the lending machines require, and records the
# device in $OUT/device.txt. Idempotent on a warm machine, so two scripts may run side by side (one
# per GPU) once the first has set up. A dry run here: PY=/work/venv/bin/python (no wheel install).
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if [ -z "${PY:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  if [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    touch /tmp/site/.installed
  fi
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
if [ -f .cache/inductor.tgz ] && [ ! -d /tmp/inductor ]; then tar xzf .cache/inductor.tgz -C /tmp; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
"$PY" -c "import torch, diffusers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"
"$PY" -c "import bench.train_step, bench.scaling, bench.baseline_naive, wanlora.models.quant" || { echo "imports fail: carry the missing wheels"; exit 1; }

# Brings compiled kernels back for the next call (the tool returns files up to 16 MB).
save_inductor_cache() {
  tar czf "$OUT/inductor.tgz" -C /tmp inductor 2>/dev/null
  [ "$(stat -c %s "$OUT/inductor.tgz")" -gt 15000000 ] && rm -f "$OUT/inductor.tgz" && echo "inductor cache too big to bring back"
}

# Runs one bench item: `run_item LIMIT_S LOG CMD...` under a time limit, prints its summary lines
# (and the log's tail on failure), then appends the log to one archive: the tool brings back at most
# 8 files, even after a timeout.
run_item() {
  local limit=$1 log=$2 rc
  shift 2
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  grep -E "built in|step [0-9]+:|ROW|CHECK|SPEED|OK|FAIL|Error|error" "$log" | cut -c1-400 | tail -14
  [ $rc -ne 0 ] && echo "!!! $(basename "$log") exited $rc" && tail -15 "$log"
  tar rf "$OUT/logs.tar" -C "$OUT" "$(basename "$log")" && rm -f "$log"
}
