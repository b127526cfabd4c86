"""Timestep distributions: goodness of fit per type x bias x expert band, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from wanlora.train.timesteps import TimestepDistribution, expert_band, loss_weight

TYPES = ["linear", "sigmoid", "shift", "weighted"]
BIASES = ["balanced", "high_noise", "low_noise"]
SHIFT = 5.0
N = 4000
KS_CRIT = 1.95 / math.sqrt(N)  # alpha = 0.001


def _u_of_t(kind: str, x: float) -> float:
    """Grid index fraction of timestep x, written from the formulas in the module docstring."""
    s = x / 1000
    if kind == "sigmoid":
        a = min(max(1 - s, 1e-12), 1 - 1e-12)
        z = math.log(a / (1 - a))
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))
    if kind == "shift":
        return 1 - s / (SHIFT - (SHIFT - 1) * s)
    return 1 - s


def _bias_cdf(bias: str, u: float) -> float:
    if bias == "high_noise":  # u = r^3
        return u ** (1 / 3)
    if bias == "low_noise":  # u = 1 - r^3
        return 1 - (1 - u) ** (1 / 3)
    return u


def _full_cdf(kind: str, bias: str, x: float) -> float:
    """P(T <= x): T <= x  <=>  u >= u(x) because the grid decreases."""
    return 1 - _bias_cdf(bias, _u_of_t(kind, x))


def _ks(samples: torch.Tensor, cdf) -> float:
    xs = samples.double().sort().values.tolist()
    n = len(xs)
    return max(max((i + 1) / n - cdf(x), cdf(x) - i / n) for i, x in enumerate(xs))


@pytest.mark.parametrize("expert", ["high", "low"])
@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("kind", TYPES)
def test_samples_follow_sliced_distribution(kind, bias, expert):
    lo, hi = expert_band(expert, 0.875)
    dist = TimestepDistribution(kind, bias, (lo, hi), SHIFT)
    t = dist.sample(N, torch.Generator().manual_seed(1))
    assert t.dtype == torch.float32 and t.shape == (N,)
    assert float(t.min()) >= lo and float(t.max()) <= hi
    f_lo, f_hi = _full_cdf(kind, bias, lo), _full_cdf(kind, bias, hi)
    d = _ks(t, lambda x: (_full_cdf(kind, bias, x) - f_lo) / (f_hi - f_lo))
    assert d < KS_CRIT, f"KS distance {d:.4f} >= {KS_CRIT:.4f}"
    assert dist.band_mass() == pytest.approx(f_hi - f_lo, abs=1e-9)


def test_wrong_distribution_is_rejected_by_the_same_test():
    """The KS check has power: shift samples do not pass as linear ones."""
    t = TimestepDistribution("shift", "balanced").sample(N, torch.Generator().manual_seed(1))
    assert _ks(t, lambda x: _full_cdf("linear", "balanced", x)) > 5 * KS_CRIT


def test_high_expert_never_below_boundary():
    for kind in TYPES:
        for bias in BIASES:
            dist = TimestepDistribution(kind, bias, expert_band("high", 0.875), SHIFT)
            t = dist.sample(20000, torch.Generator().manual_seed(7))
            assert float(t.min()) >= 875.0
    low = TimestepDistribution("shift", "high_noise", expert_band("low", 0.875), SHIFT)
    assert float(low.sample(20000, torch.Generator().manual_seed(7)).max()) < 875.0 + 1e-3


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("bias", BIASES)
def test_density_matches_cdf(kind, bias):
    """Integrals of the density between interior points equal CDF differences (the density may
    spike at a band edge, where the biased draws pile up), and it is zero outside the band."""
    for expert in ("high", "low"):
        lo, hi = expert_band(expert, 0.875)
        dist = TimestepDistribution(kind, bias, (lo, hi), SHIFT)
        a, b = lo + 0.02 * (hi - lo), hi - 0.02 * (hi - lo)
        grid = torch.linspace(a, b, 20001, dtype=torch.float64)
        dens = dist.density(grid)
        ends = dist.cdf(torch.tensor([a, b], dtype=torch.float64))
        if kind == "weighted":  # density times weight / E[weight]: check against a weighted sample mean
            t = dist.sample(200000, torch.Generator().manual_seed(5)).double()
            w = loss_weight(t)
            inside = ((t >= a) & (t <= b)).double()
            expect = float((w * inside).mean() / w.mean())
        else:
            expect = float(ends[1] - ends[0])
        assert float(torch.trapezoid(dens, grid)) == pytest.approx(expect, abs=4e-3)
        outside = [x for x in (lo - 1.0, hi + 1.0) if 0 <= x <= 1000]
        assert dist.density(torch.tensor(outside)).tolist() == [0.0] * len(outside)
    assert dist.cdf(torch.tensor([lo, hi])).tolist() == [0.0, 1.0]


def test_sigmoid_is_logit_normal_and_shift_matches_diffusers():
    # sigmoid, balanced, full range: sigma = sigmoid(N(0,1)) -> median 500, quartiles at sigmoid(+-0.674)
    t = TimestepDistribution("sigmoid", "balanced").sample(N, torch.Generator().manual_seed(3))
    q = torch.quantile(t.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    expect = [1000 / (1 + math.exp(0.6745)), 500.0, 1000 / (1 + math.exp(-0.6745))]
    assert q.tolist() == pytest.approx(expect, abs=20)
    # the shift grid is the diffusers schedule: its sigmas with shift 5
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    dist = TimestepDistribution("shift", "balanced", flow_shift=SHIFT)
    u = torch.arange(1000, dtype=torch.float64) / 1000
    assert torch.allclose(dist._t_of_u(u).float(), sched.timesteps.float(), atol=1e-3)


def test_loss_weight_shape():
    w = loss_weight(torch.tensor([1000.0, 875.0, 500.0, 0.0, 937.5]))
    assert w.tolist() == pytest.approx([0.91, 1.52, 0.93, 0.45, 1.37 + (1.51 - 1.37) * 0.25], abs=1e-4)
    grid = torch.linspace(0, 1000, 10001)
    assert float(loss_weight(grid).mean()) == pytest.approx(1.0, abs=0.06)
    assert TimestepDistribution("linear", "balanced").loss_weights(grid) is None


def test_bad_band():
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        TimestepDistribution("linear", "balanced", (900.0, 100.0))
