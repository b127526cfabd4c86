"""The frozen base of one expert exactly as training sees it, for the trainer and the sampler.

One owner for the quantization policy: which layers are quantized, which accuracy recovery they
get (an AI Toolkit adapter, a locally fitted correction, or none) and where each is cached, read
from the typed `quantization` params (`config.QuantizationConfig`). One function, `load_base`,
so that evaluation samples and validation losses come from the base the LoRA was trained
against: the same quantized weights (from the same cache, never quantized twice), the same
accuracy-recovery correction or AI Toolkit adapter, and the same fp8 matmul setting. The
correction itself (the module, the closed-form fit, the adapter reader) is `models.recovery`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wanlora.config import Expert, Params, QuantizationConfig
from wanlora.io import sha256_json
from wanlora.models import recovery
from wanlora.models.quant import DEFAULT_EXCLUDE, cache_key, quantize_cached
from wanlora.models.recovery import WeightLoader
from wanlora.report import console

#: Modes whose rounding a fitted correction is worth fitting for; 8-bit modes run without one.
FITTED_MODES = ("nf4", "uint4")


def load_base(root: Path, expert: Expert, params: Params, workspace: Path, where: str | torch.device,
              calib: list[dict] | None = None, *, work: str | torch.device | None = None,
              sampling: bool = False) -> torch.nn.Module:
    """Load `expert` from the model folder `root` into `where` and apply `params.quantization`.

    calib: forward kwargs to fit a 4-bit correction on (the trainer's), on `where`; with `sampling`
    nothing is fitted and the trainer's cached correction is reused
    (`prepare_quantized_expert(reuse_only)`). A base to quantize is read into host memory and
    quantized one linear at a time on `work` (default: the GPU if present) before it moves to
    `where`: the whole bf16 expert (28 GB for A14B) never sits on the GPU, which a 24 GB card could
    not hold. A quantized-cache hit reads only the tensors the cache lacks, straight into `where`
    (`load_transformer(skip=...)`).
    """
    from wanlora.models.loading import EXPERT_FOLDERS, load_transformer, model_identity
    from wanlora.models.quant import enable_fp8_matmul

    part, dtype = EXPERT_FOLDERS[expert], params.model.dtype
    quant = params.quantization.model_copy(update={"cache_dir": str(workspace / params.quantization.cache_dir)})
    read_to = "cpu" if quant.transformer != "none" else str(where)
    model = prepare_quantized_expert(
        lambda: load_transformer(root, expert, dtype, read_to), quant, expert,
        {"model": model_identity(root, part), "dtype": dtype},
        weights=None if sampling else recovery.weights_from_safetensors(root / part), calib_inputs=calib,
        device=work, home=where,
        partial_loader=lambda skip: load_transformer(root, expert, dtype, str(where), skip=skip),
        reuse_only=sampling,
    )
    if params.quantization.fp8_matmul:
        enable_fp8_matmul(model)
    return model


def prepare_quantized_expert(
    loader: Callable[[], nn.Module],
    cfg: QuantizationConfig,
    expert: Expert,
    source_key: dict[str, Any],
    *,
    weights: WeightLoader | None = None,
    calib_inputs: Sequence[dict[str, Any]] | None = None,
    device: str | torch.device | None = None,
    home: str | torch.device | None = None,
    partial_loader: Callable[[frozenset[str]], nn.Module] | None = None,
    reuse_only: bool = False,
) -> nn.Module:
    """Load one expert and apply the `quantization` params: quantize (cached), then attach
    accuracy recovery where it applies. The trainer's single call.

    - recovery.source = an AI Toolkit adapter: needs transformer: uint4; quantizes exactly the
      layers the adapter covers (everything else stays bf16, as in AI Toolkit) and attaches it.
    - recovery.source = fitted, 4-bit modes: fits rank-`recovery.rank` corrections on the first
      `recovery.calibration_samples` of `calib_inputs` (forward kwargs of the expert, e.g. noised
      cached latents at timesteps of its range) against `weights` (original weights by layer name),
      with `recovery.distill_steps` of refinement; cached beside the quantized weights.
    - recovery.source = none, or an 8-bit mode with fitted: quantization only.

    `device` is where each linear is quantized (`quantize_transformer`); `home`, when given, is where
    the quantized expert then moves, before a correction is fitted on inputs that live there.
    `partial_loader` (see `quantize_cached`) lets a cache hit skip reading the bf16 weights.
    `reuse_only` (sampling): never fit; attach the corrections fitted for these settings most
    recently (the trainer's, whatever its calibration data), or none, with a warning.
    """
    if cfg.transformer == "none":
        return loader()
    place = {"device": device, "home": home, "partial_loader": partial_loader}
    if cfg.recovery.source not in ("fitted", "none"):
        return _with_adapter(loader, cfg, expert, source_key, **place)
    key = {**source_key, "expert": expert}
    model = _quantized(loader, cfg, key, **place)
    if cfg.recovery.source == "none" or cfg.transformer not in FITTED_MODES:
        return model
    settings = {"quant": cache_key(key, cfg.transformer, cfg.group_size, DEFAULT_EXCLUDE, None),
                "rank": cfg.recovery.rank, "distill_steps": cfg.recovery.distill_steps}
    if reuse_only:
        return _reuse_fitted(model, cfg, expert, settings)
    return _fit_or_load(model, cfg, settings, weights, calib_inputs)


def _quantized(loader: Callable[[], nn.Module], cfg: QuantizationConfig, key: dict[str, Any], *,
               device: str | torch.device | None, home: str | torch.device | None,
               partial_loader: Callable[[frozenset[str]], nn.Module] | None, **layers: Any) -> nn.Module:
    """The expert quantized (or read from the cache) on `device`, then moved to `home`; `layers`
    (`exclude=`, `include=`) narrows what is quantized, as `quantize_cached` takes it."""
    model = quantize_cached(loader, cfg.cache_dir, key, cfg.transformer, cfg.group_size, device=device,
                            partial_loader=partial_loader, **layers)
    return model if home is None else model.to(home)


def _with_adapter(loader: Callable[[], nn.Module], cfg: QuantizationConfig, expert: Expert,
                  source_key: dict[str, Any], **place: Any) -> nn.Module:
    """AI Toolkit's recipe: uint4 on exactly the layers its adapter covers, the adapter beside
    them. The adapter's identity keys the cache, so another adapter never meets these weights."""
    source = cfg.recovery.source
    if cfg.transformer != "uint4":
        raise ValueError(
            f"quantization.recovery.source={source!r} is an AI Toolkit adapter, trained against "
            f"uint4 weights; set quantization.transformer: uint4 (got {cfg.transformer}) or recovery.source: fitted"
        )
    targets = recovery.adapter_targets(source, expert)
    key = {**source_key, "expert": expert, "adapter": recovery.resolve_adapter_source(source).identity}
    model = _quantized(loader, cfg, key, exclude=(), include=targets, **place)
    recovery.load_aitk_adapter(model, source, expert)
    return model


def _fitted_file(cfg: QuantizationConfig, settings: dict[str, Any], calibration: str = "*") -> Path:
    """`<cache_dir>/recovery/<settings hash>-<hash with the calibration digest>.safetensors`; the
    default `*` is the glob of every fit of these settings, whatever its calibration data."""
    stem = sha256_json(settings)[:16]
    tail = calibration if calibration == "*" else sha256_json({**settings, "calibration": calibration})[:16]
    return Path(cfg.cache_dir) / "recovery" / f"{stem}-{tail}.safetensors"


def _reuse_fitted(model: nn.Module, cfg: QuantizationConfig, expert: Expert, settings: dict[str, Any]) -> nn.Module:
    """The sampler's side: the correction most recently fitted for these settings, or none, warned."""
    pattern = _fitted_file(cfg, settings)
    fitted = sorted(pattern.parent.glob(pattern.name), key=lambda p: p.stat().st_mtime)
    if not fitted:
        console.print(f"[yellow]{expert}: no fitted recovery for these settings in {pattern.parent}; the quantized "
                      "base runs without its correction (run the train stage first)[/]")
        return model
    recovery.load_corrections(model, fitted[-1], settings, ignore=("calibration",))
    return model


def _fit_or_load(model: nn.Module, cfg: QuantizationConfig, settings: dict[str, Any],
                 weights: WeightLoader | None, calib_inputs: Sequence[dict[str, Any]] | None) -> nn.Module:
    """The trainer's side: fit on the calibration inputs once, then load that fit from the cache."""
    if weights is None or not calib_inputs:
        raise ValueError(
            "quantization.recovery.source=fitted needs calibration inputs and the original weights; "
            "pass them, or set recovery.source: none"
        )
    calib = list(calib_inputs)[: cfg.recovery.calibration_samples]
    digest = _inputs_digest(calib)
    fit_key, path = {**settings, "calibration": digest}, _fitted_file(cfg, settings, digest)
    if path.is_file():
        recovery.load_corrections(model, path, fit_key)
        return model
    recovery.fit_model(weights, model, calib, cfg.recovery.rank, distill_steps=cfg.recovery.distill_steps)
    recovery.save_corrections(model, path, fit_key)
    return model


def _inputs_digest(inputs: Sequence[dict[str, Any]]) -> str:
    """Content hash of calibration inputs (tensors by bytes, the rest by repr)."""
    h = hashlib.sha256()
    for kw in inputs:
        for k in sorted(kw):
            v = kw[k]
            h.update(k.encode())
            if torch.is_tensor(v):
                t = v.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(v).encode())
    return h.hexdigest()
