#!/usr/bin/env bash
# Follows a `bench/run_tier.sh` started in its own session (setsid: it outlives the device call
# that started it, so one run can span two calls on the same warm machine):
#   bash bench/tier/follow.sh LOG SECONDS
# prints the log's progress lines as they come, returns when the run ends or after SECONDS, and
# copies the log and the run's results into $OUT (what a call brings back).
log=$1 limit=$2 t0=$(date +%s) seen=0
while :; do
  if [ -f "$log" ]; then
    n=$(wc -l <"$log")
    [ "$n" -gt "$seen" ] && sed -n "$((seen + 1)),${n}p" "$log" | tr '\r' '\n' |
      grep -E "===|WROTE|MODEL|Running stage|REPRO|error|Error|FAIL|Traceback|quantiz|fitted|recovery|train .*/|evaluate:|export:|^\|" | cut -c1-250
    seen=$n
    grep -q "^REPRO rc=" "$log" && sleep 2 && break
  fi
  [ $(( $(date +%s) - t0 )) -ge "$limit" ] && echo "follow: still running after ${limit} s ($(date -u +%T))" && break
  sleep 5
done
[ -n "${OUT:-}" ] && { cp "$log" "$OUT/" 2>/dev/null; cp /root/tier_out/* "$OUT/" 2>/dev/null; tail -5 "$log"; } 
free -g | head -2; nvidia-smi --query-gpu=memory.used --format=csv,noheader
