"""Plot the effective training-timestep density of every type x bias, per expert band.

Writes docs/timesteps.png for the README: one panel per (timestep_type, timestep_bias), the
high-noise band (t >= boundary*1000) and the low-noise band drawn as separate curves, each the
in-band density `TimestepDistribution.density` scaled by the band's share of the unrestricted
draw (so the two curves of a panel together integrate to one and show how much each expert
would get under `expert_choice: proportional`). A histogram of 20k sampled timesteps is drawn
under each curve as a check that sampling and formula agree.

    python bench/plot_timesteps.py [--out docs/timesteps.png] [--shift 5] [--boundary 0.875]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from wanlora.io import atomic_write_bytes  # noqa: E402
from wanlora.train.timesteps import TimestepDistribution, expert_band  # noqa: E402

TYPES = ("linear", "sigmoid", "shift", "weighted")
BIASES = ("balanced", "high_noise", "low_noise")
COLOURS = {"high": "tab:red", "low": "tab:blue"}


def plot(shift: float, boundary: float, samples: int = 20000) -> bytes:
    fig, axes = plt.subplots(len(TYPES), len(BIASES), figsize=(13, 11), sharex=True)
    for r, kind in enumerate(TYPES):
        for c, bias in enumerate(BIASES):
            ax = axes[r][c]
            for expert in ("high", "low"):
                lo, hi = expert_band(expert, boundary)
                dist = TimestepDistribution(kind, bias, (lo, hi), shift)
                mass = dist.band_mass()
                t = torch.linspace(lo + 1e-3, hi - 1e-3, 600, dtype=torch.float64)
                ax.plot(t, dist.density(t) * mass, color=COLOURS[expert], lw=1.6,
                        label=f"{expert} ({mass:.0%} of draws)")
                drawn = dist.sample(samples, torch.Generator().manual_seed(0)).double()
                weights = dist.loss_weights(drawn)
                w = torch.full_like(drawn, mass / samples) if weights is None else weights / weights.sum() * mass
                ax.hist(drawn.numpy(), bins=40, range=(lo, hi), weights=w.numpy() / ((hi - lo) / 40),
                        color=COLOURS[expert], alpha=0.25)
            ax.axvline(boundary * 1000, color="k", lw=0.8, ls="--")
            ax.set_title(f"{kind} / {bias}", fontsize=10)
            ax.set_yscale("log")
            ax.set_ylim(1e-6, 5e-2)
            ax.legend(fontsize=7, loc="upper left")
            if r == len(TYPES) - 1:
                ax.set_xlabel("timestep t (sigma = t/1000)")
            if c == 0:
                ax.set_ylabel("density x band share")
    fig.suptitle(f"Training timesteps per expert (flow_shift={shift}, boundary={boundary}); "
                 "weighted = density x loss weight", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/timesteps.png"))
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--boundary", type=float, default=0.875)
    args = ap.parse_args()
    atomic_write_bytes(args.out, plot(args.shift, args.boundary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
