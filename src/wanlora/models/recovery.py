"""Accuracy recovery for 4-bit bases: a frozen low-rank correction B·A beside every quantized linear.

A quantized layer computes W_q·x; with a correction it computes W_q·x + B·A·x, which can win back
much of what rounding lost for the inputs the layer really sees. The correction is part of the
base model, not of the user's LoRA: it lives in non-persistent buffers of a `LowRankCorrection`
child ("recovery") of the quantized module and is added by a forward hook, so it is never a
parameter (no optimizer sees it), never in a state dict (no LoRA file carries it), stays on when
peft disables the LoRA (DOP's base pass), and nothing can merge it into the weights.

Two sources:
1. A published AI Toolkit accuracy-recovery adapter (ARA, `quantization.recovery.source`: a local
   .safetensors or `owner/repo/file.safetensors` on the hub). AI Toolkit loads it as a LoRA with
   alpha = rank on every layer it names, quantizes exactly those layers (uint4 for Wan 2.2), runs
   the LoRA in bf16 beside the quantized layer at multiplier 1.0, and leaves every other layer in
   bf16 (its "uint8" pass for the rest is a no-op). `load_aitk_adapter` reproduces that:
   y = W_q·x + up(down(x)), scale 1.
2. Fitted locally (`fit_correction`, `fit_model`): the closed-form minimiser of
   ||(W - W_q - B·A)·X||_F for calibration activations X: whiten the error by the input covariance
   C = X·Xᵀ (E·C^½), truncate its SVD to the rank, un-whiten. Without activations it is the plain
   truncated SVD of W - W_q (Eckart-Young), the optimum when inputs are isotropic. A small ridge
   (relative to C's largest eigenvalue) keeps rank-deficient covariances invertible; it is the
   exact optimum of the objective plus ridge·||W - W_q - B·A||².
   Random weights fed isotropic inputs leave little to recover (the rounding error's spectrum is
   flat); real activations are strongly anisotropic, which is where whitening pays:
   `bench/recovery_report.py` measures both honestly.

Which source applies to an expert, and the caches that keep its correction fitted once, are the
quantization policy of `wanlora.models.expert` (`prepare_quantized_expert`).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import Tensor, nn

from wanlora.config import Expert
from wanlora.export.formats import AITK_EXPERTS, from_native_name
from wanlora.models.quant import dequantized_weight, is_quantized, quantized_modules
from wanlora.report import console
from wanlora.tensorfiles import save_streamed


AITK_EXPERT_PREFIX = {e: f"{name}." for e, name in AITK_EXPERTS.items()}
BlockInput = tuple[tuple[Any, ...], dict[str, Any]]
WeightLoader = Callable[[str], Tensor]


# --------------------------------------------------------------------- the correction module
class LowRankCorrection(nn.Module):
    """y += scale · up(down(x)), computed in the dtype of `down` (AI Toolkit: bf16)."""

    def __init__(self, down: Tensor, up: Tensor, scale: float = 1.0):
        super().__init__()
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"correction shapes do not chain: down {tuple(down.shape)}, up {tuple(up.shape)}")
        self.register_buffer("down", down.detach().clone(), persistent=False)
        self.register_buffer("up", up.detach().clone(), persistent=False)
        self.scale = float(scale)
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}, scale={self.scale}, enabled={self.enabled}"


def _add_correction(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
    corr: LowRankCorrection = module.recovery
    if not corr.enabled:
        return None
    return output + corr(args[0]).to(output.dtype)


def attach_correction(module: nn.Module, down: Tensor, up: Tensor, scale: float = 1.0) -> LowRankCorrection:
    """Put a frozen correction beside `module` (a linear, usually quantized); replaces an earlier one."""
    if down.shape[1] != module.in_features or up.shape[0] != module.out_features:
        raise ValueError(
            f"correction {tuple(up.shape)}x{tuple(down.shape)} does not fit a linear "
            f"{module.in_features}->{module.out_features}"
        )
    detach_correction(module)
    corr = LowRankCorrection(down, up, scale)
    module.add_module("recovery", corr)
    corr._hook = module.register_forward_hook(_add_correction)
    return corr


def detach_correction(module: nn.Module) -> None:
    corr = getattr(module, "recovery", None)
    if isinstance(corr, LowRankCorrection):
        corr._hook.remove()
        del module.recovery


def corrections(model: nn.Module) -> dict[str, LowRankCorrection]:
    """Every correction by the name of the linear it corrects."""
    return {
        name.removesuffix(".recovery"): m for name, m in model.named_modules() if isinstance(m, LowRankCorrection)
    }



# ------------------------------------------------------------------------- closed form
def solve_dtype(device: torch.device) -> torch.dtype:
    """float64 on the CPU (exact, and cheap at the sizes the CPU sees); float32 on a GPU, where
    float64 eigensolvers of 5120-13824 wide matrices are ~10x slower and the leading rank-16
    directions we keep are far above float32's rounding."""
    return torch.float64 if device.type == "cpu" else torch.float32


@dataclass(frozen=True)
class Whitener:
    """Eigenbasis Q and √eigenvalues of a (ridged) input covariance C = Q·Λ·Qᵀ, shared by the
    layers that read the same input. Working in the eigenbasis avoids forming C^±½ (two extra
    in x in x in products)."""

    basis: Tensor
    root: Tensor

    @classmethod
    def from_covariance(cls, cov: Tensor, ridge: float = 1e-6) -> Whitener:
        cov = cov.to(solve_dtype(cov.device))
        evals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
        floor = ridge * float(evals.max().clamp(min=torch.finfo(evals.dtype).tiny))
        return cls(vecs, (evals.clamp(min=0) + floor).sqrt())


def _top_svd(m: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The `rank` leading singular triplets of m from the eigendecomposition of its smaller Gram
    matrix: one symmetric eigh of min(out, in)² instead of a full SVD of out x in (5120 x 13824
    for a Wan FFN layer); exact to working precision for the leading triplets we keep."""
    r = min(rank, *m.shape)
    wide = m.shape[0] <= m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    evals, vecs = torch.linalg.eigh(gram)
    evals, vecs = evals.flip(0)[:r].clamp(min=0), vecs.flip(1)[:, :r]
    s = evals.sqrt()
    inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    if wide:
        return vecs, s, (vecs.T @ m) * inv[:, None]
    return (m @ vecs) * inv, s, vecs.T


def fit_correction_whitened(error: Tensor, whitener: Whitener | None, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) minimising ||(error - B·A)·C^½||_F; plain truncated SVD when `whitener` is None.

    With C = Q·Λ·Qᵀ: the SVD of E·Q·Λ^½ = U·Σ·V'ᵀ gives B = U·√Σ, A = √Σ·V'ᵀ·Λ^-½·Qᵀ (the optimum
    of the whitened problem mapped back; factors balanced)."""
    if rank < 1:
        raise ValueError(f"recovery rank must be at least 1, got {rank}")
    e = error.to(solve_dtype(error.device))
    if whitener is None:
        u, s, vh = _top_svd(e, rank)
        root = s.sqrt()
        return (root[:, None] * vh).float(), (u * root).float()
    q, lam = whitener.basis.to(e.device, e.dtype), whitener.root.to(e.device, e.dtype)
    u, s, vh = _top_svd((e @ q) * lam, rank)
    root = s.sqrt()
    a = ((root[:, None] * vh) / lam) @ q.T
    return a.float(), (u * root).float()


def fit_correction(
    W: Tensor, Wq: Tensor, X: Tensor | None, rank: int, ridge: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Closed-form (A [rank, in], B [out, rank]) minimising ||(W - Wq - B·A)·X||_F.

    X holds calibration inputs as columns, shape (in, n) (any leading layout reshapes to that:
    pass `x.reshape(-1, in).T`). None means isotropic inputs: the plain SVD optimum.
    """
    dtype = solve_dtype(W.device)
    error = W.to(dtype) - Wq.to(dtype)
    if X is None:
        return fit_correction_whitened(error, None, rank)
    if X.shape[0] != W.shape[1]:
        raise ValueError(f"X must be (in_features={W.shape[1]}, n), got {tuple(X.shape)}")
    x = X.to(dtype)
    return fit_correction_whitened(error, Whitener.from_covariance(x @ x.T, ridge), rank)



# -------------------------------------------------------------------- AI Toolkit adapters
_ADAPTER_HUB = re.compile(r"^([\w.-]+)/([\w.-]+)/([\w.-]+\.safetensors)(?:@([\w.-]+))?$")


@dataclass(frozen=True)
class AdapterFile:
    """An accuracy-recovery adapter on disk and what it is: `owner/repo@<commit>/<file>#<sha256>`
    for a hub file (the commit the revision resolved to), `<file name>#<sha256>` for a local one.
    The identity keys the quantized-weight cache and the training run, so a changed adapter never
    meets weights or a half-trained LoRA made with another."""

    path: Path
    identity: str


@functools.lru_cache(maxsize=8)
def resolve_adapter_source(source: str) -> AdapterFile:
    """A local file, or AI Toolkit's hub form `owner/repo/file.safetensors`, optionally pinned as
    `owner/repo/file.safetensors@<commit or tag>`, fetched with huggingface_hub at that revision
    (cached; needs network the first time). Unpinned means `main`, and the run says which commit
    that was and how to pin it, since `main` can move under a re-download."""
    from wanlora.models.loading import content_sha256

    if os.path.exists(source):
        path = Path(source)
        return AdapterFile(path, f"{path.name}#{content_sha256(path)}")
    m = _ADAPTER_HUB.match(source)
    if not m:
        raise FileNotFoundError(
            f"quantization.recovery.source={source!r}: no such file, and not a hub path of the form "
            "owner/repo/file.safetensors[@revision] (e.g. ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors)"
        )
    from huggingface_hub import hf_hub_download

    repo, name, revision = f"{m[1]}/{m[2]}", m[3], m[4] or "main"
    path = Path(hf_hub_download(repo, filename=name, revision=revision))
    commit = path.parent.name  # huggingface_hub returns snapshots/<commit>/<file>
    if m[4] is None:
        console.print(f"[yellow]recovery: {source} is not pinned; using {repo}@{commit}. Pin it: "
                      f"quantization.recovery.source: {source}@{commit}[/]")
    return AdapterFile(path, f"{repo}@{commit}/{name}#{content_sha256(path)}")


def aitk_module_name(key_module: str) -> str:
    """diffusers module path for the module part of an AI Toolkit LoRA key, accepting both its
    saved form (`diffusion_model.blocks.0.self_attn.q`) and diffusers form
    (`transformer.blocks.0.attn1.to_q`). The expert prefix (`transformer_1.`) is kept. Native names
    go through the LoRA importer's table (`formats.from_native_name`); any other name is kept as
    it is, and `load_aitk_adapter` refuses it if the model has no such layer."""
    head, _, rest = key_module.partition(".")
    name = rest if head in ("diffusion_model", "transformer") else key_module
    prefix = next((p for p in AITK_EXPERT_PREFIX.values() if name.startswith(p)), "")
    module = name[len(prefix):]
    return prefix + (from_native_name(module) or module)


def read_aitk_adapter(state: dict[str, Tensor], expert: Expert | None, source: str = "adapter") -> dict[str, tuple[Tensor, Tensor]]:
    """{diffusers linear name: (down, up)} for one expert from an AI Toolkit LoRA state dict.

    Keys are `<module>.lora_A.weight` / `.lora_B.weight` (peft form, what AI Toolkit saves for
    transformers) or `.lora_down.weight` / `.lora_up.weight`; `.alpha` is ignored, as AI Toolkit
    ignores it for peft-format networks (alpha = rank, scale 1). A combined Wan 2.2 file names the
    experts `transformer_1` (high noise) and `transformer_2` (low noise).
    """
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith(".alpha"):
            continue
        for suffix, role in ((".lora_A.weight", "down"), (".lora_down.weight", "down"),
                             (".lora_B.weight", "up"), (".lora_up.weight", "up")):
            if key.endswith(suffix):
                pairs.setdefault(aitk_module_name(key[: -len(suffix)]), {})[role] = value
                break
        else:
            raise ValueError(
                f"{source}: key {key!r} is not a LoRA down/up weight; only LoRA accuracy-recovery adapters "
                "are supported (LoKr and full-weight ARAs are not)"
            )
    experts = {p for name in pairs for p in AITK_EXPERT_PREFIX.values() if name.startswith(p)}
    if experts and expert is None:
        raise ValueError(f"{source}: holds both Wan 2.2 experts; say which to load (expert='high' or 'low')")
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, roles in pairs.items():
        if experts:
            prefix = AITK_EXPERT_PREFIX[expert]  # type: ignore[index]
            if not name.startswith(prefix):
                continue
            name = name[len(prefix):]
        if set(roles) != {"down", "up"}:
            raise ValueError(f"{source}: {name} has only lora_{'A' if 'down' in roles else 'B'}; the file is incomplete")
        out[name] = (roles["down"], roles["up"])
    if not out:
        raise ValueError(f"{source}: no LoRA weights for the {expert} expert")
    return out


def _load_adapter_state(source: str) -> tuple[dict[str, Tensor], str]:
    from safetensors.torch import load_file

    path = resolve_adapter_source(source).path
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: accuracy-recovery adapters are read from .safetensors only")
    return load_file(str(path)), str(path)


def adapter_targets(source: str, expert: Expert | None) -> list[str]:
    """The linears an AI Toolkit adapter covers: quantize exactly these (`include=`, `exclude=()`),
    as AI Toolkit does, so the adapter meets the base it was trained against."""
    state, path = _load_adapter_state(source)
    return sorted(read_aitk_adapter(state, expert, path))


def load_aitk_adapter(model: nn.Module, source: str, expert: Expert | None) -> list[str]:
    """Attach an AI Toolkit adapter's corrections (frozen, model dtype, scale 1) to `model`'s
    quantized linears. Every covered layer must exist and be quantized; returns their names."""
    state, path = _load_adapter_state(source)
    pairs = read_aitk_adapter(state, expert, path)
    for name, (down, up) in sorted(pairs.items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: adapter layer {name} does not exist in this model (another architecture?)") from None
        if not is_quantized(module):
            raise ValueError(
                f"{path}: adapter layer {name} is not quantized; quantize with include=adapter_targets(...) "
                "so the adapter meets the uint4 base it was trained against"
            )
        dtype = getattr(module, "compute_dtype", None) or dequantized_weight(module).dtype
        device = next(iter(module.buffers()), next(iter(module.parameters()), torch.empty(0))).device
        attach_correction(module, down.to(device, dtype), up.to(device, dtype), scale=1.0)
    console.print(f"recovery: {len(pairs)} layers corrected by {resolve_adapter_source(source).identity}")
    return sorted(pairs)


# ------------------------------------------------------------------------ calibration
class _Captured(Exception):
    pass


def capture_block_inputs(model: nn.Module, inputs: Iterable[dict[str, Any]], blocks_attr: str = "blocks") -> list[BlockInput]:
    """The (args, kwargs) the first block receives for each model input (stops there: the rest
    of the model does not run)."""
    first = getattr(model, blocks_attr)[0]
    got: list[BlockInput] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append((args, kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for kw in inputs:
                try:
                    model(**kw)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return got


def with_hidden(inp: BlockInput, hidden: Tensor) -> BlockInput:
    """A block input with its hidden states replaced (the next block's input)."""
    args, kwargs = inp
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def run_block(block: nn.Module, inp: BlockInput) -> Tensor:
    """A block's hidden-state output for one captured input."""
    out = block(*inp[0], **inp[1])
    return out[0] if isinstance(out, tuple) else out


class _CovarianceHooks:
    """Accumulate Xᵀ·X of each named linear's input over calibration batches (fp32). Layers fed
    the very same tensor (q, k, v) share one product per batch."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.cov: dict[str, Tensor] = {}
        self.shared: dict[str, str] = {}  # layer -> first layer that always saw the same input
        # per batch: input identity -> (first layer, product, the input itself). Holding the input
        # keeps its memory alive, so no later tensor of the batch can reuse its address.
        self._batch: dict[tuple, tuple[str, Tensor, Tensor]] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape), x.dtype)
            if key in self._batch:
                first, prod, _ = self._batch[key]
                self.shared.setdefault(name, first)
                if self.shared[name] != first:
                    self.shared[name] = name
            else:
                flat = x.reshape(-1, x.shape[-1]).float()
                prod = flat.T @ flat
                self._batch[key] = (name, prod, x)
                self.shared[name] = name
            self.cov[name] = self.cov[name] + prod if name in self.cov else prod.clone()

        return hook

    def next_batch(self) -> None:
        self._batch.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _fit_layers(
    modules: dict[str, nn.Module], hooks: _CovarianceHooks | None, weights: WeightLoader,
    prefix: str, rank: int, ridge: float,
) -> dict[str, tuple[Tensor, Tensor]]:
    fitted: dict[str, tuple[Tensor, Tensor]] = {}
    whiteners: dict[str, Whitener | None] = {}
    for name, module in modules.items():
        cov = hooks.cov.get(name) if hooks else None
        owner = hooks.shared.get(name, name) if hooks else name
        if owner not in whiteners:
            whiteners[owner] = None if cov is None else Whitener.from_covariance(cov, ridge)
        wq = dequantized_weight(module)
        w = weights(prefix + name).to(wq.device)
        dt = solve_dtype(wq.device)
        a, b = fit_correction_whitened(w.to(dt) - wq.to(dt), whiteners[owner], rank)
        dtype = getattr(module, "compute_dtype", None) or wq.dtype
        attach_correction(module, a.to(dtype), b.to(dtype))
        fitted[prefix + name] = (a, b)
    return fitted


def fit_model(
    weights: WeightLoader,
    qmodel: nn.Module,
    calib_inputs: Sequence[dict[str, Any]],
    rank: int,
    *,
    blocks_attr: str = "blocks",
    ridge: float = 1e-6,
    distill_steps: int = 0,
    distill_lr: float = 1e-3,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Fit and attach a correction to every quantized linear of `qmodel`, block after block.

    `weights(name)` returns the original (bf16) weight of linear `name` (`weights_from_model`,
    `weights_from_safetensors`), so the bf16 expert never has to be in memory beside the quantized
    one. The first block's inputs are captured from `calib_inputs` (forward kwargs of the model);
    each block then sees the outputs of the already-corrected blocks before it (sequential, as
    GPTQ-style calibration does), and only one block's covariances exist at a time. Quantized
    linears before the blocks are fitted on the capture pass's activations; any after the blocks
    (none by default: proj_out stays bf16) get the plain-SVD fit. With `distill_steps`, each
    block's corrections are then refined by `distill_block` against the bf16 block.
    Returns {name: (A, B)} in fp32.
    """
    blocks = getattr(qmodel, blocks_attr)
    all_q = quantized_modules(qmodel)
    block_prefixes = [f"{blocks_attr}.{i}." for i in range(len(blocks))]
    outside = {n: m for n, m in all_q.items() if not any(n.startswith(p) for p in block_prefixes)}

    hooks = _CovarianceHooks(outside)
    try:
        captured = []
        for kw in calib_inputs:
            captured += capture_block_inputs(qmodel, [kw], blocks_attr)
            hooks.next_batch()
    finally:
        hooks.remove()
    seen = {n: m for n, m in outside.items() if n in hooks.cov}
    fitted = _fit_layers(seen, hooks, weights, "", rank, ridge)
    fitted |= _fit_layers({n: m for n, m in outside.items() if n not in seen}, None, weights, "", rank, ridge)

    for i, block in enumerate(track(blocks, description="fitting recovery", console=console, disable=len(blocks) < 8)):
        prefix = block_prefixes[i]
        fitted |= fit_block(block, captured, weights, prefix, rank, ridge)
        if distill_steps:
            distill_block(block, reference_block(block, weights, prefix), captured, distill_steps, distill_lr)
            for name, corr in corrections(block).items():
                fitted[prefix + name] = (corr.down.float(), corr.up.float())
        with torch.no_grad():
            captured = [with_hidden(inp, run_block(block, inp)) for inp in captured]
    return fitted


def fit_block(
    block: nn.Module, inputs: Sequence[BlockInput], weights: WeightLoader, prefix: str, rank: int, ridge: float = 1e-6
) -> dict[str, tuple[Tensor, Tensor]]:
    """Fit and attach corrections for one block's quantized linears from the activations they see
    when the block runs on `inputs`; `prefix` (`blocks.3.`) turns block-relative names into the
    names `weights` knows. Returns {prefixed name: (A, B)}."""
    inner = quantized_modules(block)
    for module in inner.values():
        detach_correction(module)  # fit against the bare quantized layer
    hooks = _CovarianceHooks(inner)
    try:
        with torch.no_grad():
            for inp in inputs:
                run_block(block, inp)
                hooks.next_batch()
    finally:
        hooks.remove()
    return _fit_layers(inner, hooks, weights, prefix, rank, ridge)


def reference_block(qblock: nn.Module, weights: WeightLoader, prefix: str) -> nn.Module:
    """A full-precision copy of a quantized block: same modules, quantized linears replaced by
    plain linears holding the original weights from `weights`."""
    ref = copy.deepcopy(qblock)
    for name, module in quantized_modules(ref).items():
        w = weights(prefix + name)
        lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.to(dequantized_weight(module).device), requires_grad=False)
        if module.bias is not None:
            lin.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, child, lin)
    return ref.requires_grad_(False)


def distill_block(
    qblock: nn.Module, ref_block: nn.Module, inputs: Sequence[BlockInput], steps: int, lr: float = 1e-3
) -> tuple[float, float]:
    """Refine `qblock`'s corrections (Adam on fp32 copies) so the quantized block reproduces the
    reference block's outputs on `inputs`. Returns the relative output error before and after."""
    with torch.no_grad():
        targets = [run_block(ref_block, inp).float() for inp in inputs]
    corrs = list(corrections(qblock).values())
    if not corrs:
        raise ValueError("distill_block: the block has no corrections to refine; fit them first")
    masters = [(c, c.down.float().requires_grad_(True), c.up.float().requires_grad_(True)) for c in corrs]
    opt = torch.optim.Adam([t for _, d, u in masters for t in (d, u)], lr=lr)

    def loss_fn() -> Tensor:
        for c, d, u in masters:
            c.down, c.up = d.to(c.down.dtype), u.to(c.up.dtype)
        total = sum(
            ((run_block(qblock, inp).float() - t).pow(2).sum() / t.pow(2).sum()) for inp, t in zip(inputs, targets)
        )
        return total / len(inputs)

    with torch.no_grad():
        before = float(loss_fn()) ** 0.5
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for c, d, u in masters:
            c.down, c.up = d.detach().to(c.down.dtype), u.detach().to(c.up.dtype)
        after = float(loss_fn()) ** 0.5
    return before, after


def weights_from_model(model: nn.Module) -> WeightLoader:
    """Original weights from a bf16 model held in memory (tests, benchmarks)."""
    return lambda name: model.get_submodule(name).weight.detach()


def weights_from_safetensors(folder: str | Path) -> WeightLoader:
    """Original weights read lazily, one tensor at a time, from a diffusers transformer folder
    (single file or sharded with its index: the files the loader reads, `loading.weight_files`)."""
    from safetensors import safe_open

    from wanlora.models.loading import ModelError, weight_files
    from wanlora.tensorfiles import MODEL_HEADER_BYTES, read_header

    folder = Path(folder)
    where = {key: path for path in weight_files(folder, "transformer")
             for key in read_header(path, ModelError, MODEL_HEADER_BYTES, "a model shard's")[0]}

    def load(name: str) -> Tensor:
        key = f"{name}.weight"
        if key not in where:
            raise KeyError(f"{folder}: no tensor {key}")
        with safe_open(str(where[key]), "pt") as f:
            return f.get_tensor(key)

    return load


# ------------------------------------------------------------------ fitted corrections on disk
def save_corrections(model: nn.Module, path: str | Path, key: dict[str, Any]) -> None:
    """Fitted corrections as safetensors (`<layer>.down`, `<layer>.up`), the key in the header."""
    tensors = {}
    for name, corr in corrections(model).items():
        tensors[f"{name}.down"], tensors[f"{name}.up"] = corr.down, corr.up
    save_streamed(path, tensors, {"wanlora_recovery": json.dumps(key, sort_keys=True)})


def load_corrections(model: nn.Module, path: str | Path, key: dict[str, Any], ignore: Sequence[str] = ()) -> int:
    """Attach corrections saved by `save_corrections`; the header key must match, except for the
    fields in `ignore` (the sampler accepts whatever calibration data the trainer used)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        saved = json.loads((f.metadata() or {}).get("wanlora_recovery", "null"))
        if not isinstance(saved, dict) or {k: v for k, v in saved.items() if k not in ignore} != key:
            raise ValueError(f"{path}: corrections were fitted for other settings; delete the file to refit")
        names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        for name in names:
            module = model.get_submodule(name)
            device = next(iter(module.buffers()), next(iter(module.parameters()), torch.empty(0))).device
            attach_correction(module, f.get_tensor(f"{name}.down").to(device), f.get_tensor(f"{name}.up").to(device))
    return len(names)
