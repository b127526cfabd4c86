"""CPU side of the cuDNN FP8 attention kernels (`wanlora.models.fp8_attention`): refusal, scales, and
the delayed-scaling sequence. The kernels themselves need a Hopper GPU: bench/fp8_attention.py
measured them (bench/RESULTS.md, H200 section)."""

from __future__ import annotations

import math

import pytest
import torch

from wanlora.errors import UserError
from wanlora.models import fp8_attention as fa


def test_refuses_on_cpu_naming_the_fix() -> None:
    with pytest.raises(UserError, match=r"NVIDIA GPU only.*attention_backend: auto"):
        fa.check_available(torch.device("cpu"))


def test_pow2_scale_is_the_largest_power_of_two_under_448() -> None:
    amax = torch.tensor([1e-6, 3e-3, 0.7, 1.0, 5.3, 447.0, 448.0, 1e4])
    s = fa.pow2_scale(amax)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # exact powers of two
    assert bool((amax * s <= fa.E4M3_MAX).all()) and bool((amax * 2 * s > fa.E4M3_MAX).all())
    assert math.isfinite(fa.pow2_scale(torch.tensor(0.0)).item())  # an all-zero tensor does not divide by 0


def test_quantize_is_torchs_e4m3_cast_of_the_scaled_tensor_and_round_trips() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 4, 32, generator=g) * 3).to(torch.bfloat16)
    codes, descale = fa.quantize(x)
    scale = fa.pow2_scale(x.abs().amax())
    assert codes.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert torch.equal(codes.view(torch.uint8), (x.float() * scale).to(torch.float8_e4m3fn).view(torch.uint8))
    assert descale.item() == 1.0 / scale.item()
    back = fa.dequantize(codes, descale, torch.float32)
    normal = x.float().abs() * scale >= 2.0**-6  # e4m3 normals carry 3 mantissa bits: half an ulp is 2^-4
    err = (back - x.float()).abs()
    assert bool((err[normal] <= 2.0**-4 * x.float().abs()[normal] + 1e-12).all())
    assert codes.float().abs().max().item() <= fa.E4M3_MAX


def test_grad_scales_leave_the_margin() -> None:
    amax = torch.tensor([1e-4, 2e-4, 3e-2, 5e-5])
    s = fa.grad_scales(amax, margin=2.0)
    assert bool((2 * amax * s <= fa.E4M3_MAX).all()) and bool((4 * amax * s > fa.E4M3_MAX).all())


def test_a_sites_first_backward_refines_its_scales_then_later_ones_use_history(monkeypatch) -> None:
    """First backward: unit scales (dS amax is right, dQ/dK flushed), then dS scaled from that
    amax (dQ/dK/dV amaxes are right), then both; a later backward runs once from the state."""
    calls: list[torch.Tensor] = []
    replies = iter([torch.tensor([1e-13, 1e-13, 7e-5, 3e-5]),  # unit scales: dQ, dK flushed
                    torch.tensor([1.1e-4, 9.8e-5, 7.5e-5, 3.2e-5]),
                    torch.tensor([1.2e-4, 9.0e-5, 7.0e-5, 3.0e-5]),
                    torch.tensor([1.3e-4, 9.1e-5, 7.1e-5, 3.1e-5])])

    def fake_backward(do, q, k, v, o8, descale_o, stats, attn_scale, scales):
        calls.append(scales.clone())
        return q, k, v, next(replies)

    monkeypatch.setattr(fa, "backward", fake_backward)
    state = fa.fresh_state(torch.device("cpu"))
    t = torch.zeros(1, 4, 1, 8)
    fa.backward_with_state(t, t, t, t, t, t, t, 0.1, state)
    assert len(calls) == 3
    assert torch.equal(calls[0], torch.ones(4))
    assert torch.equal(calls[1], fa.grad_scales(torch.tensor([1e-13, 1e-13, 7e-5, 3e-5])))
    assert torch.equal(calls[2], fa.grad_scales(torch.tensor([1.1e-4, 9.8e-5, 7.5e-5, 3e-5])))
    assert torch.equal(state, torch.tensor([1.2e-4, 9.0e-5, 7.0e-5, 3.0e-5]))  # what the last pass saw
    fa.backward_with_state(t, t, t, t, t, t, t, 0.1, state)
    assert len(calls) == 4 and torch.equal(calls[3], fa.grad_scales(torch.tensor([1.2e-4, 9.0e-5, 7.0e-5, 3.0e-5])))
