"""The 'best' checkpoint of each expert: the lowest held-out loss, or an earlier one within noise.

The two experts are chosen apart: they train on different timestep bands at different rates, so
the high- and low-noise LoRAs may stop improving at different steps, and nothing forces the two
exported files to come from the same one.

Within noise: the losses of every checkpoint are measured on the same terms (sample x timestep x
fixed noise draw, `wanlora.evaluate.validation`), so two checkpoints compare pairwise. The noise of
a comparison is the standard error of the mean of the per-term differences, estimated from their
spread; a checkpoint whose mean loss exceeds the lowest one by no more than that is as good as far
as this measurement can tell. Among those, the earliest wins: it has drifted least from the base
model, and the seed guide's experience is that the last checkpoint is rarely the one to keep. This
is the one-standard-error rule of model selection (Hastie, Tibshirani & Friedman, The Elements of
Statistical Learning, 2nd ed., section 7.10: "the most parsimonious model whose error is no more
than one standard error above the error of the best model"), with the standard error of paired
differences, which is smaller than that of each mean because the noise is shared.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Choice:
    """One expert's pick: the step, the lowest-loss step, the noise margin, and why in words."""

    step: int
    loss: float
    lowest_step: int
    lowest_loss: float
    noise: float  # standard error of the paired difference to the lowest (0: one term, no estimate)
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def paired_noise(a: list[float], b: list[float]) -> float:
    """Standard error of mean(a - b) over paired terms (0.0 when fewer than two terms)."""
    if len(a) != len(b):
        raise ValueError(f"terms do not pair: {len(a)} against {len(b)} (different samples or timesteps?)")
    if len(a) < 2:
        return 0.0
    return statistics.stdev([x - y for x, y in zip(a, b)]) / math.sqrt(len(a))


def choose_best(terms: dict[int, list[float]], label: str = "held-out") -> Choice | None:
    """The earliest step whose mean loss is within one paired standard error of the lowest.

    `terms` maps each checkpoint step to its per-term losses (same terms, same order, at every
    step); steps without terms are ignored; None when no step has any. `label` names the clips the
    loss is on, for the reason text."""
    scored = {s: t for s, t in sorted(terms.items()) if t}
    if not scored:
        return None
    mean = {s: statistics.fmean(t) for s, t in scored.items()}
    low = min(scored, key=lambda s: (mean[s], s))
    noise = 0.0  # of the comparison with the latest earlier checkpoint, when the lowest itself wins
    for s in scored:
        if s >= low:
            break
        noise = paired_noise(scored[s], scored[low])
        if mean[s] - mean[low] <= noise:
            return Choice(s, mean[s], low, mean[low], noise,
                          f"step {s}: {label} loss {mean[s]:.5g} is within one standard error ({noise:.2g}, over "
                          f"{len(scored[s])} fixed-noise terms) of the lowest, {mean[low]:.5g} at step {low}; "
                          "the earlier checkpoint is kept")
    later = "; every earlier checkpoint is more than one standard error above it" if low != min(scored) else ""
    return Choice(low, mean[low], low, mean[low], noise, f"step {low}: lowest {label} loss, {mean[low]:.5g}{later}")
