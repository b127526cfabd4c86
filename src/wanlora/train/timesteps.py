"""Training timestep distributions, restricted to one expert's band.

AI Toolkit builds a descending grid of 1000 timesteps whose spacing is the distribution
(`timestep_type`), draws an index into it (`content_or_style`: uniform, or cubic toward the start
or the end of the grid) and, for Wan 2.2's two experts, maps that draw onto the index range of
the grid entries inside the expert's band (`BaseSDTrainProcess.process_general_training_batch`:
`value_map(index, 0, 999, min_noise_steps, max_noise_steps)`). We keep that model but make it
continuous and exact:

- the grid is a decreasing map g: u in [0, 1] -> t in [0, 1000] (u is the index / 1000):
  linear  t = 1000 (1 - u)
  sigmoid t = 1000 (1 - sigmoid(z)), z = Phi^-1(u)   (logit-normal noise level, unshifted)
  shift   t = 1000 * shift_sigma(1 - u, flow_shift)   (the training schedule diffusers shifts)
  weighted: the linear grid, each sample's loss times `loss_weight(t)`
- an expert's band (high: t >= boundary*1000, low: t below) is an interval [u0, u1] of the grid
  index, and the draw is u = u0 + v (u1 - u0) with the bias as the law of v in [0, 1]:
  balanced v = r; high_noise v = r^3 (AI Toolkit's 'content': toward the band's top, its highest
  noise); low_noise v = 1 - r^3 ('style'), r uniform. So the cubic skew is re-applied inside
  every band: high bias on the low expert still favours that band's noisiest end, as in AI
  Toolkit. (A balanced draw is uniform in u either way; over the whole range the law is the
  unrestricted one.)

`TimestepDistribution.density` is the effective in-band density (for lineage metadata and the
README plot), and `band_mass` the probability the unrestricted, whole-schedule draw lands in the
band (the expert's share when experts are chosen in proportion to their bands).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wanlora.config import Expert, TimestepBias, TimestepType
from wanlora.train.flowmatch import NUM_TRAIN_TIMESTEPS, shift_sigma, unshift_sigma

# Loss weight of the 'weighted' type at t = 1000, 900, ..., 0: knots read off AI Toolkit's
# default_weighing_scheme (measured on Flex.1, seen on other flow-match models too), interpolated
# linearly between knots. It peaks near t = 875 and halves toward t = 0; mean over t is ~1.
_WEIGHT_T = (1000.0, 950.0, 900.0, 875.0, 850.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0, 200.0, 100.0, 50.0, 0.0)
_WEIGHT_W = (0.91, 1.37, 1.51, 1.52, 1.51, 1.44, 1.26, 1.08, 0.93, 0.80, 0.73, 0.72, 0.72, 0.58, 0.45)

_T = float(NUM_TRAIN_TIMESTEPS)
_V_LAW = {"balanced": "v = r", "high_noise": "v = r^3", "low_noise": "v = 1 - r^3"}
_GRID = {"linear": "1000 (1 - u)", "weighted": "1000 (1 - u), loss times the weighted curve",
         "sigmoid": "1000 (1 - sigmoid(Phi^-1(u)))", "shift": "1000 shift_sigma(1 - u, flow_shift)"}


def expert_band(expert: Expert, boundary_ratio: float | None) -> tuple[float, float]:
    """[lo, hi] timestep interval of an expert: high noise takes t >= boundary*1000, low the rest,
    a single transformer (TI2V 5B's "main", no boundary) all of them."""
    if expert == "main":
        return (0.0, _T)
    cut = boundary_ratio * _T
    return (cut, _T) if expert == "high" else (0.0, cut)


def loss_weight(t: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight of the 'weighted' type (see the knots above)."""
    xs = torch.tensor(_WEIGHT_T[::-1], dtype=torch.float64)
    ws = torch.tensor(_WEIGHT_W[::-1], dtype=torch.float64)
    t64 = t.to(torch.float64).clamp(0, _T)
    i = torch.searchsorted(xs, t64, right=True).clamp(1, len(xs) - 1)
    x0, x1, w0, w1 = xs[i - 1], xs[i], ws[i - 1], ws[i]
    return (w0 + (w1 - w0) * (t64 - x0) / (x1 - x0)).to(t.dtype if t.is_floating_point() else torch.float32)


@dataclass(frozen=True)
class TimestepDistribution:
    """Timesteps of one expert: `type` and `bias` as in params.train, `band` = [lo, hi] in t."""

    type: TimestepType
    bias: TimestepBias
    band: tuple[float, float] = (0.0, _T)
    flow_shift: float = 5.0

    def __post_init__(self) -> None:
        lo, hi = self.band
        if not 0 <= lo < hi <= _T:
            raise ValueError(f"timestep band {self.band} must satisfy 0 <= lo < hi <= {_T:g}")

    # ---- the grid map g(u) -> t and its inverse
    def _t_of_u(self, u: torch.Tensor) -> torch.Tensor:
        if self.type == "sigmoid":
            return _T * (1 - torch.sigmoid(torch.special.ndtri(u)))
        if self.type == "shift":
            return _T * shift_sigma(1 - u, self.flow_shift)
        return _T * (1 - u)

    def _u_of_t(self, t: torch.Tensor) -> torch.Tensor:
        s = t / _T
        if self.type == "sigmoid":
            return torch.special.ndtr(torch.logit(1 - s))
        if self.type == "shift":
            return 1 - unshift_sigma(s, self.flow_shift)
        return 1 - s

    def _du_dt(self, t: torch.Tensor) -> torch.Tensor:
        """|du/dt|, the Jacobian that turns a density over u into one over t."""
        s = t / _T
        if self.type == "sigmoid":
            a = 1 - s
            z = torch.logit(a)
            phi = torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5
            return phi / (a * (1 - a)) / _T
        if self.type == "shift":
            k = self.flow_shift
            return k / (k - (k - 1) * s) ** 2 / _T
        return torch.full_like(t, 1 / _T)

    # ---- the bias: law of v in [0, 1] (over the whole grid, v = u)
    def _cdf_v(self, v: torch.Tensor) -> torch.Tensor:
        if self.bias == "high_noise":
            return v.clamp(0, 1) ** (1 / 3)
        if self.bias == "low_noise":
            return 1 - (1 - v.clamp(0, 1)) ** (1 / 3)
        return v.clamp(0, 1)

    def _icdf_v(self, p: torch.Tensor) -> torch.Tensor:
        if self.bias == "high_noise":
            return p**3
        if self.bias == "low_noise":
            return 1 - (1 - p) ** 3
        return p

    def _v_of_r(self, r: torch.Tensor) -> torch.Tensor:
        """AI Toolkit's draw itself ('content' r^3, 'style' 1 - r^3): the same law as `_icdf_v`
        but the same value for the same r, so a draw can be compared with AI Toolkit's one to one."""
        if self.bias == "high_noise":
            return r**3
        if self.bias == "low_noise":
            return 1 - r**3
        return r

    def _pdf_v(self, v: torch.Tensor) -> torch.Tensor:
        if self.bias == "high_noise":
            return v.clamp_min(1e-12) ** (-2 / 3) / 3
        if self.bias == "low_noise":
            return (1 - v).clamp_min(1e-12) ** (-2 / 3) / 3
        return torch.ones_like(v)

    def index_range(self) -> tuple[float, float]:
        """[u0, u1]: the grid-index interval of the band (g decreases: the band's top is u0)."""
        lo, hi = torch.tensor(self.band, dtype=torch.float64)
        return float(self._u_of_t(hi)), float(self._u_of_t(lo))

    def _v_of_t(self, t: torch.Tensor) -> torch.Tensor:
        u0, u1 = self.index_range()
        return (self._u_of_t(t) - u0) / (u1 - u0)

    # ---- public
    def band_mass(self) -> float:
        """Probability that the unrestricted (whole-schedule) draw falls in this band."""
        u0, u1 = self.index_range()
        return float(self._cdf_v(torch.tensor(u1, dtype=torch.float64)) - self._cdf_v(torch.tensor(u0, dtype=torch.float64)))

    def _draw(self, r: torch.Tensor) -> torch.Tensor:
        """AI Toolkit's map of a uniform r onto the band: t = g(u0 + v(r) (u1 - u0)), float64."""
        u0, u1 = self.index_range()
        return self._t_of_u(u0 + self._v_of_r(r.to(torch.float64)) * (u1 - u0)).clamp(*self.band)

    def quantile(self, p: torch.Tensor) -> torch.Tensor:
        """The in-band timestep with P(T <= t) = p: T <= t <=> u >= u(t), so v = F_v^-1(1 - p)."""
        u0, u1 = self.index_range()
        return self._t_of_u(u0 + self._icdf_v(1 - p.to(torch.float64)) * (u1 - u0)).clamp(*self.band)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` float32 timesteps in the band from `generator` (CPU), one uniform r each, mapped as
        AI Toolkit maps its draw (a monotone map of r: an exact inverse-CDF draw of the law)."""
        return self._draw(torch.rand(n, generator=generator, dtype=torch.float64)).to(torch.float32)

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """P(T <= t) for the in-band sampling law (before any loss weighting)."""
        t64 = t.to(torch.float64).clamp(*self.band)
        return (1 - self._cdf_v(self._v_of_t(t64))).clamp(0, 1)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights: only the 'weighted' type has them."""
        return loss_weight(t) if self.type == "weighted" else None

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """Effective in-band density over t (zero outside the band).

        For 'weighted' this is the sampling density times the loss weight, renormalised over the
        band: the share of the gradient each timestep contributes, which is what a reader of the
        metadata or the README plot wants to compare across types.
        """
        t64 = t.to(torch.float64)
        lo, hi = self.band
        inside = (t64 >= lo) & (t64 <= hi)
        tc = t64.clamp(max(lo, 1e-6), min(hi, _T - 1e-6))
        u0, u1 = self.index_range()
        dens = self._pdf_v(self._v_of_t(tc)) * self._du_dt(tc) / (u1 - u0)
        if self.type == "weighted":
            # E[w(T)] over the band, by the midpoint rule in probability space (smooth there,
            # whereas the density over t may have an integrable spike at a band edge)
            r = (torch.arange(4096, dtype=torch.float64) + 0.5) / 4096
            mean_w = loss_weight(self._draw(r)).mean()
            dens = dens * loss_weight(tc) / mean_w
        return torch.where(inside, dens, torch.zeros_like(dens))

    def describe(self) -> dict[str, object]:
        """Plain summary for lineage metadata: the in-band law in words and its quartiles in t,
        so a reader can tell a band-relative skew from a sliced one without our code."""
        u0, u1 = self.index_range()
        quartiles = self.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        return {"type": self.type, "bias": self.bias, "band_lo": self.band[0], "band_hi": self.band[1],
                "flow_shift": self.flow_shift, "band_mass": round(self.band_mass(), 6),
                "index_lo": round(u0, 6), "index_hi": round(u1, 6),
                "in_band": f"u = index_lo + v * (index_hi - index_lo), {_V_LAW[self.bias]}, r ~ U(0, 1); "
                           f"t = {_GRID[self.type]}",
                "quartiles_t": [round(float(q), 2) for q in quartiles]}
