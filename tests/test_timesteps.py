"""Timestep distributions: goodness of fit per type x bias x expert band, against closed forms,
and the in-band law against AI Toolkit's index arithmetic."""

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


def _bias_cdf(bias: str, v: float) -> float:
    """CDF of the index fraction v in [0, 1] (over the whole grid v = u)."""
    if bias == "high_noise":  # v = r^3
        return v ** (1 / 3)
    if bias == "low_noise":  # v = 1 - r^3
        return 1 - (1 - v) ** (1 / 3)
    return v


def _full_cdf(kind: str, bias: str, x: float) -> float:
    """P(T <= x) of the unrestricted draw: T <= x  <=>  u >= u(x) because the grid decreases."""
    return 1 - _bias_cdf(bias, _u_of_t(kind, x))


def _in_band_cdf(kind: str, bias: str, lo: float, hi: float, x: float) -> float:
    """P(T <= x) inside [lo, hi]: u = u0 + v (u1 - u0) with u0 = u(hi), u1 = u(lo)."""
    u0, u1 = _u_of_t(kind, hi), _u_of_t(kind, lo)
    return 1 - _bias_cdf(bias, (_u_of_t(kind, x) - u0) / (u1 - u0))


def _ks(samples: torch.Tensor, cdf) -> float:
    xs = samples.double().sort().values.tolist()
    n = len(xs)
    return max(max((i + 1) / n - cdf(x), cdf(x) - i / n) for i, x in enumerate(xs))


@pytest.mark.parametrize("expert", ["high", "low"])
@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("kind", TYPES)
def test_samples_follow_the_in_band_law(kind, bias, expert):
    lo, hi = expert_band(expert, 0.875)
    dist = TimestepDistribution(kind, bias, (lo, hi), SHIFT)
    t = dist.sample(N, torch.Generator().manual_seed(1))
    assert t.dtype == torch.float32 and t.shape == (N,)
    assert float(t.min()) >= lo and float(t.max()) <= hi
    d = _ks(t, lambda x: _in_band_cdf(kind, bias, lo, hi, x))
    assert d < KS_CRIT, f"KS distance {d:.4f} >= {KS_CRIT:.4f}"
    # band_mass stays the unrestricted draw's share of the band (proportional expert choice)
    assert dist.band_mass() == pytest.approx(_full_cdf(kind, bias, hi) - _full_cdf(kind, bias, lo), abs=1e-9)


def _aitk_draw(bias: str, expert: str, r: torch.Tensor) -> torch.Tensor:
    """AI Toolkit's training timesteps for Wan 2.2 with `timestep_type: linear`, re-implemented
    from its code: the grid is `torch.linspace(1000, 1, 1000)` (toolkit/samplers/
    custom_flowmatch_sampler.py, `set_train_timesteps`); the expert's index range comes from
    `searchsorted` on that grid and `content`/`style` draw `r^3 * 1000` / `(1 - r^3) * 1000`, then
    `value_map(x, 0, 999, min_noise_steps, max_noise_steps)`, `.long()` and clamp
    (jobs/process/BaseSDTrainProcess.py, `process_general_training_batch`, 'adjust_multistage_timesteps'
    and 'prepare_timesteps_indices')."""
    grid = torch.linspace(1000, 1, 1000)
    asc = torch.flip(grid, dims=[0])
    top, bottom = (1.0, 0.875) if expert == "high" else (0.875, 0.0)
    first = int(len(asc) - torch.searchsorted(asc, torch.tensor(top * 1000), right=False)) - 1
    last = int(len(asc) - torch.searchsorted(asc, torch.tensor(bottom * 1000), right=True)) - 1
    x = r**3 * 1000 if bias == "high_noise" else (1 - r**3) * 1000
    idx = (first + x * (last - first) / 999).long().clamp(first, last)
    return grid[idx]


def _median_closed_form(kind: str, bias: str, expert: str) -> float:
    """t at r = 1/2: u = u0 + v(1/2) (u1 - u0), v(1/2) = 1/8 (content) or 7/8 (style)."""
    lo, hi = expert_band(expert, 0.875)
    u0, u1 = _u_of_t(kind, hi), _u_of_t(kind, lo)
    u = u0 + (0.125 if bias == "high_noise" else 0.875) * (u1 - u0)
    s = 1 - u
    return 1000 * (SHIFT * s / (1 + (SHIFT - 1) * s) if kind == "shift" else s)


# (type, bias, expert): AI Toolkit's median t, from issue 14; our earlier sliced law gave
# 577, 936, 715 and 945 for these four
AITK_MEDIANS = {("linear", "high_noise", "low"): 766.0, ("linear", "low_noise", "high"): 892.0,
                ("shift", "high_noise", "low"): 840.0, ("shift", "low_noise", "high"): 897.0}


@pytest.mark.parametrize("case", sorted(AITK_MEDIANS))
def test_bias_is_reapplied_inside_each_band_as_ai_toolkit_does(case):
    """For `content`/`style` AI Toolkit maps the cubic draw onto the expert's index range
    (jobs/process/BaseSDTrainProcess.py, `process_general_training_batch`: `value_map` onto
    [min_noise_steps, max_noise_steps]), so high bias on the low expert still favours the top of
    the low band. The median is the closed form of that map, the issue's AI Toolkit number within
    its grid rounding (AI Toolkit draws whole indices of a 1000-entry grid), the sample median
    agrees, and the LoRA header's quartiles are the same law."""
    kind, bias, expert = case
    dist = TimestepDistribution(kind, bias, expert_band(expert, 0.875), SHIFT)
    want = _median_closed_form(kind, bias, expert)
    assert want == pytest.approx(AITK_MEDIANS[case], abs=1.5)
    t = dist.sample(20000, torch.Generator().manual_seed(4)).double()
    assert float(t.median()) == pytest.approx(want, abs=3.0)
    assert float(dist.quantile(torch.tensor([0.5], dtype=torch.float64))) == pytest.approx(want, abs=1e-6)
    described = dist.describe()
    assert described["quartiles_t"][1] == pytest.approx(want, abs=0.01)
    q = [float(x) for x in dist.quantile(torch.tensor([0.25, 0.75], dtype=torch.float64))]
    assert described["quartiles_t"][0] == pytest.approx(q[0], abs=0.01) and q[0] < want < q[1]
    assert described["in_band"].startswith("u = index_lo + v * (index_hi - index_lo), v = ")


@pytest.mark.parametrize("expert", ["high", "low"])
@pytest.mark.parametrize("bias", ["high_noise", "low_noise"])
def test_linear_draws_match_ai_toolkit_index_arithmetic(bias, expert):
    """Draw for draw (same r), our continuous map lands within AI Toolkit's grid rounding of its
    whole-index timestep (`_aitk_draw`): at most 2 timesteps apart, for every pair of bias and
    expert, including the two that a law sliced from the whole schedule got wrong."""
    r = torch.rand(100000, generator=torch.Generator().manual_seed(0))
    ours = TimestepDistribution("linear", bias, expert_band(expert, 0.875))._draw(r.double())
    theirs = _aitk_draw(bias, expert, r).double()
    assert float((ours - theirs).abs().max()) <= 2.0


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
