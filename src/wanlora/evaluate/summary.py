"""`data/eval/metrics.json`: one flat row per run, with keys that mean the same in every run.

`dvc exp show` makes a column of each metrics key, so a key must not name a step: two
experiments saved at different steps would share no column. Per-checkpoint values live in
`val_loss.json` (`dvc plots`); here each expert gets its best step and the validation loss there
and at the last checkpoint, on the basis `best` used (held-out clips, or training clips when none
could be spared; `basis` says which), and the final training loss smoothed over its recent steps.
Throughput and memory are measurements, not functions of the inputs: the train stage writes them
to `data/train_perf/summary.json` (`wanlora.train.monitor`), the other metrics file.
"""

from __future__ import annotations

import math
from typing import Any

from wanlora.data.split import HELD_OUT

SMOOTHING = 0.9  # weight of the running average per logged step: about the last ten steps count


def smoothed_last(values: list[float], beta: float = SMOOTHING) -> float:
    """The bias-corrected exponential moving average at the last value (TensorBoard's smoothing
    with Adam's start-up correction, so a short run is not pulled toward zero)."""
    avg = 0.0
    for v in values:
        avg = beta * avg + (1 - beta) * v
    return avg / (1 - beta ** len(values))


def run_summary(basis: str, held_out_clips: int, best: dict[str, dict], losses: dict[int, dict[str, float]],
                train_curves: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """The flat summary. `best`: best.json's experts; `losses`: per checkpoint step, the mean
    fixed-noise losses (`held_out_high`, `train_low`, ...); `train_curves`: the trainer's dvclive
    curves (`loss_high`: [(step, loss), ...]). Keys of what was not measured are left out."""
    name = "held_out" if basis == HELD_OUT else "train"
    out: dict[str, Any] = {"basis": basis, "held_out_clips": held_out_clips}
    if losses:
        out["last_step"] = max(losses)
    for e in ("high", "low"):
        if e in best:
            out[f"best_step_{e}"] = best[e]["step"]
            out[f"val_loss_best_{e}"] = losses[best[e]["step"]][f"{name}_{e}"]
        last = [s for s in sorted(losses) if f"{name}_{e}" in losses[s]]
        if last:
            out[f"val_loss_last_{e}"] = losses[last[-1]][f"{name}_{e}"]
        curve = [v for _, v in train_curves.get(f"loss_{e}", []) if math.isfinite(v)]  # a skipped step logs nan
        if curve:
            out[f"train_loss_smoothed_{e}"] = smoothed_last(curve)
    return out
