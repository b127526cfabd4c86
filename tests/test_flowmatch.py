"""Flow-matching formulas against diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from wanlora.train import flowmatch as fm


def test_add_noise_equals_scale_noise_at_schedule_timesteps():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 16, 2, 4, 4, generator=g)
    eps = torch.randn(3, 16, 2, 4, 4, generator=g)
    t = sched.timesteps[torch.tensor([0, 400, 999])]
    ours = fm.add_noise(x0, eps, t)
    theirs = sched.scale_noise(x0, t, eps)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # sigma = t / 1000 is exactly the scheduler's sigma for each of its timesteps
    assert torch.allclose(fm.sigma_of(sched.timesteps), sched.sigmas, atol=1e-6)


def test_shifted_sigmas_match_set_timesteps():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    # diffusers spaces the inference grid between its (already shifted) sigma_max and sigma_min,
    # then shifts that grid
    unshifted = torch.linspace(float(sched.sigma_max), float(sched.sigma_min), 50)
    sched.set_timesteps(50)
    assert torch.allclose(fm.shift_sigma(unshifted, 5.0), sched.sigmas[:-1], atol=1e-5)
    back = fm.unshift_sigma(fm.shift_sigma(unshifted, 5.0), 5.0)
    assert torch.allclose(back, unshifted, atol=1e-6)


def test_velocity_is_the_euler_direction():
    """One Euler step of the scheduler with the true velocity lands on the flow path."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 4, 1, 2, 2, generator=g), torch.randn(1, 4, 1, 2, 2, generator=g)
    t0, t1 = sched.timesteps[3], sched.timesteps[4]
    xt = fm.add_noise(x0, eps, t0.view(1))
    sched._step_index = 3
    stepped = sched.step(fm.velocity_target(x0, eps), t0, xt).prev_sample
    assert torch.allclose(stepped, fm.add_noise(x0, eps, t1.view(1)), atol=1e-5)


def test_bf16_sigma_follows_latent_dtype_and_losses():
    x0 = torch.ones(2, 1, 1, 1, 1, dtype=torch.bfloat16)
    out = fm.add_noise(x0, torch.zeros_like(x0), torch.tensor([250.0, 1000.0]))
    assert out.dtype == torch.bfloat16 and out.flatten().tolist() == [0.75, 0.0]
    pred, target = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    per = fm.per_sample_mse(pred, target)
    assert per.tolist() == pytest.approx([1.0, 4 / 3], abs=1e-7)
    assert float(fm.weighted_mean(per, None)) == pytest.approx((1 + 4 / 3) / 2)
    assert float(fm.weighted_mean(per, torch.tensor([2.0, 0.0]))) == 1.0
