"""What accuracy recovery wins back, measured: relative output errors of a quantized Wan expert
against its bf16 twin, per layer, per block and end to end, with the corrections off and on.

Used by `bench/quant.py` and the tests, never by a stage, so it lives beside the benchmarks and
not in the package. `anisotropic` draws the synthetic activations those measurements need: random
weights fed isotropic inputs leave little to recover (the rounding error's spectrum is flat),
real activations are strongly anisotropic, which is where the whitened fit pays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wanlora.models.quant import quantized_modules
from wanlora.models.recovery import (
    BlockInput,
    capture_block_inputs,
    corrections,
    run_block,
    solve_dtype,
    with_hidden,
)


def relative_error(reference: Tensor, approx: Tensor) -> float:
    ref = reference.to(torch.float64)
    return float((approx.to(torch.float64) - ref).norm() / ref.norm().clamp(min=1e-30))


def set_recovery_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every correction on or off (for before/after measurements)."""
    for corr in corrections(model).values():
        corr.enabled = enabled


@dataclass
class ErrorPair:
    before: float
    after: float


@dataclass
class RecoveryReport:
    """Relative output error vs bf16 (‖ŷ - y‖/‖y‖), without and with the corrections.

    layers[name][split] and blocks[i][split] with split "calib" or "heldout". Each block is fed
    the bf16 model's input to it, so block errors do not compound; `model` is end to end.
    """

    layers: dict[str, dict[str, ErrorPair]] = field(default_factory=dict)
    blocks: list[dict[str, ErrorPair]] = field(default_factory=list)
    model: dict[str, ErrorPair] = field(default_factory=dict)

    def table(self) -> str:
        rows = ["| scope | calib before | calib after | held-out before | held-out after |", "|---|---|---|---|---|"]

        def row(label: str, d: dict[str, ErrorPair]) -> str:
            c, h = d.get("calib"), d.get("heldout")
            cells = [f"{p.before:.4f} | {p.after:.4f}" if p else "- | -" for p in (c, h)]
            return f"| {label} | {cells[0]} | {cells[1]} |"

        rows += [row(f"block {i}", b) for i, b in enumerate(self.blocks)]
        if self.model:
            rows.append(row("model output", self.model))
        return "\n".join(rows)


def _block_split_errors(
    ref_block: nn.Module, q_block: nn.Module, inputs: Sequence[BlockInput]
) -> tuple[dict[str, ErrorPair], ErrorPair, list[Tensor]]:
    names = list(quantized_modules(q_block))
    xs: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = [
        ref_block.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: xs[n].append(a[0].detach()))
        for n in names
    ]
    try:
        with torch.no_grad():
            ref_out = [run_block(ref_block, inp) for inp in inputs]
    finally:
        for h in handles:
            h.remove()
    result: dict[str, list[float]] = {}
    with torch.no_grad():
        for enabled in (False, True):
            set_recovery_enabled(q_block, enabled)
            for n in names:
                ref_lin, q_lin = ref_block.get_submodule(n), q_block.get_submodule(n)
                y = torch.cat([ref_lin(x).reshape(-1) for x in xs[n]])
                yq = torch.cat([q_lin(x).reshape(-1) for x in xs[n]])
                result.setdefault(n, []).append(relative_error(y, yq))
            out = torch.cat([run_block(q_block, inp).reshape(-1) for inp in inputs])
            result.setdefault("__block__", []).append(relative_error(torch.cat([r.reshape(-1) for r in ref_out]), out))
    set_recovery_enabled(q_block, True)
    layer = {n: ErrorPair(*result[n]) for n in names}
    return layer, ErrorPair(*result["__block__"]), ref_out


def block_report(
    ref_block: nn.Module, q_block: nn.Module, splits: dict[str, Sequence[BlockInput]]
) -> tuple[dict[str, dict[str, ErrorPair]], dict[str, ErrorPair]]:
    """Per-layer and whole-block errors of one quantized block against its bf16 twin, per split."""
    layers: dict[str, dict[str, ErrorPair]] = {}
    block: dict[str, ErrorPair] = {}
    for split, inputs in splits.items():
        per_layer, whole, _ = _block_split_errors(ref_block, q_block, inputs)
        for n, pair in per_layer.items():
            layers.setdefault(n, {})[split] = pair
        block[split] = whole
    return layers, block


def recovery_report(
    ref_model: nn.Module,
    q_model: nn.Module,
    calib_inputs: Sequence[dict[str, Any]],
    heldout_inputs: Sequence[dict[str, Any]],
    blocks_attr: str = "blocks",
) -> RecoveryReport:
    """Measure what the corrections recover: every quantized layer and block of `q_model` against
    `ref_model` (same architecture, bf16), on calibration and held-out model inputs."""
    report = RecoveryReport()
    ref_blocks, q_blocks = getattr(ref_model, blocks_attr), getattr(q_model, blocks_attr)
    for split, model_inputs in (("calib", calib_inputs), ("heldout", heldout_inputs)):
        inputs = capture_block_inputs(ref_model, model_inputs, blocks_attr)
        for i, (rb, qb) in enumerate(zip(ref_blocks, q_blocks)):
            per_layer, whole, outs = _block_split_errors(rb, qb, inputs)
            for n, pair in per_layer.items():
                report.layers.setdefault(f"{blocks_attr}.{i}.{n}", {})[split] = pair
            if len(report.blocks) <= i:
                report.blocks.append({})
            report.blocks[i][split] = whole
            inputs = [with_hidden(inp, out) for inp, out in zip(inputs, outs)]
        with torch.no_grad():
            ref_out = torch.cat([_first(ref_model(**kw)).reshape(-1) for kw in model_inputs])
            pair = []
            for enabled in (False, True):
                set_recovery_enabled(q_model, enabled)
                pair.append(relative_error(ref_out, torch.cat([_first(q_model(**kw)).reshape(-1) for kw in model_inputs])))
            set_recovery_enabled(q_model, True)
        report.model[split] = ErrorPair(*pair)
    return report


def _first(out: Any) -> Tensor:
    if isinstance(out, tuple):
        return out[0]
    return out.sample if hasattr(out, "sample") else out


def anisotropic(
    n: int, dim: int, decay: float = 2.0, seed: int = 0, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """(n, dim) samples whose covariance has eigenvalues k^-decay (k = 1..dim) along a random
    orthonormal basis: the documented anisotropic spectrum of our measurements (decay 2 by default).
    Draw calibration and held-out samples in one call so they share the basis."""
    device = torch.device(device)
    work = solve_dtype(device)
    g = torch.Generator(device).manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=work, device=device))
    std = torch.arange(1, dim + 1, dtype=work, device=device).pow(-decay / 2)
    z = torch.randn(n, dim, generator=g, dtype=work, device=device)
    return ((z * std) @ basis.T).to(dtype)
