"""LoRA key formats for Wan 2.2: ours (peft names, as diffusers saves them), ComfyUI's native Wan
names, and kohya-style names as musubi-tuner writes them.

Every format is read into and written from one neutral form, `Lora` (per diffusers module name:
down, up, alpha), so N formats need N readers and N writers instead of N^2 converters. Every
reader is strict: a key it cannot place raises with the full list, never drops. A LoRA that loses
half its layers on the way still "loads" in ComfyUI (it only logs a warning) and just looks weak,
which costs a user far more than an error.

Key forms, for the module `blocks.0.attn1.to_q` of the diffusers model:
- ours / diffusers: `transformer.blocks.0.attn1.to_q.lora_A.weight` (+ `.lora_B.weight`); alpha in
  the `lora_adapter_metadata` header entry (diffusers' convention) or our lineage entries.
- ComfyUI / AI Toolkit (native Wan names): `diffusion_model.blocks.0.self_attn.q.lora_down.weight`
  (or `lora_A`), `.lora_up.weight` (or `lora_B`), `.alpha` (a scalar; absent means alpha = rank).
- musubi-tuner (kohya): `lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.lora_up.weight`, `.alpha`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wanlora.errors import UserError
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry for the peft LoraConfig
OURS_PREFIX = "transformer."
NATIVE_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
#: AI Toolkit's DualWanTransformer3DModel names the high-noise expert transformer_1, the low
#: transformer_2; a combined file (LoRA or recovery adapter) carries the name in each key.
AITK_EXPERTS = {"high": "transformer_1", "low": "transformer_2"}

# diffusers module name <-> native Wan module name (the names of ComfyUI's comfy/ldm/wan/model.py
# and the original Wan code). Written from the rename table diffusers uses to load native Wan
# checkpoints (`convert_wan_transformer_to_diffusers`); the tests check it against that function.
# `{n}` is a block index.
MODULE_NAMES: tuple[tuple[str, str], ...] = (
    ("blocks.{n}.attn1.to_q", "blocks.{n}.self_attn.q"),
    ("blocks.{n}.attn1.to_k", "blocks.{n}.self_attn.k"),
    ("blocks.{n}.attn1.to_v", "blocks.{n}.self_attn.v"),
    ("blocks.{n}.attn1.to_out.0", "blocks.{n}.self_attn.o"),
    ("blocks.{n}.attn2.to_q", "blocks.{n}.cross_attn.q"),
    ("blocks.{n}.attn2.to_k", "blocks.{n}.cross_attn.k"),
    ("blocks.{n}.attn2.to_v", "blocks.{n}.cross_attn.v"),
    ("blocks.{n}.attn2.to_out.0", "blocks.{n}.cross_attn.o"),
    ("blocks.{n}.attn2.add_k_proj", "blocks.{n}.cross_attn.k_img"),
    ("blocks.{n}.attn2.add_v_proj", "blocks.{n}.cross_attn.v_img"),
    ("blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.0"),
    ("blocks.{n}.ffn.net.2", "blocks.{n}.ffn.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("proj_out", "head.head"),
    ("patch_embedding", "patch_embedding"),
)


class LoraFormatError(UserError, ValueError):
    """A LoRA file whose keys, shapes or type we cannot use; the message lists what and why."""


@dataclass
class LoraModule:
    """One adapted layer: W' = W + (alpha / rank) * up @ down."""

    down: torch.Tensor  # lora_A / lora_down: [rank, in] (conv: [rank, in, kt, kh, kw])
    up: torch.Tensor  # lora_B / lora_up: [out, rank] (conv: [out, rank, 1, 1, 1])
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


Lora = dict[str, LoraModule]  # keyed by diffusers module name, e.g. "blocks.0.attn1.to_q"


# ------------------------------------------------------------------------------ module names
def _pattern(template: str, sep: str) -> re.Pattern[str]:
    body = re.escape(template.replace(".", sep)).replace(re.escape("{n}"), r"(?P<n>\d+)")
    return re.compile(body + r"\Z")


_TO_NATIVE = [(_pattern(d, "."), n) for d, n in MODULE_NAMES]
_FROM_NATIVE = [(_pattern(n, "."), d) for d, n in MODULE_NAMES]
_FROM_KOHYA = [(_pattern(n, "_"), d) for d, n in MODULE_NAMES]


def _translate(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def to_native_name(module: str) -> str:
    """Native Wan name of a diffusers module; raises for a module ComfyUI has no name for."""
    native = _translate(module, _TO_NATIVE)
    if native is None:
        raise LoraFormatError(
            f"no ComfyUI (native Wan) name for diffusers module '{module}'; known: "
            + ", ".join(d for d, _ in MODULE_NAMES)
            + ". Remove it from network.target_modules or add its name to wanlora.export.formats.MODULE_NAMES"
        )
    return native


def from_native_name(native: str) -> str | None:
    """diffusers name of a native Wan module, None for a name the table does not know. The one
    native-to-diffusers translation: LoRA imports and AI Toolkit recovery adapters both read it."""
    return _translate(native, _FROM_NATIVE)


def _from_kohya_name(name: str) -> str | None:
    return _translate(name, _FROM_KOHYA)


# ------------------------------------------------------------------------------------ alpha
def _adapter_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The peft LoraConfig fields diffusers stores in the header, without the `transformer.` prefix."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    cfg = json.loads(raw)
    return {k.removeprefix(OURS_PREFIX): v for k, v in cfg.items()}


_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _pattern_value(module: str, patterns: Mapping[str, Any]) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: a key matches a whole-name suffix of the module
    (`attn1.to_q` matches `blocks.0.attn1.to_q`).

    Differs from peft on purpose: peft compiles each key as a regular expression
    (`peft.utils.other.get_pattern_key`), so a key read from a downloaded file could hang the
    import (catastrophic backtracking) or crash it (invalid syntax). Keys are matched literally,
    and a key that is not a plain module name is refused rather than silently ignored, which would
    rescale that module's LoRA."""
    for key, value in patterns.items():
        if not isinstance(key, str) or not _MODULE_NAME.fullmatch(key):
            raise LoraFormatError(
                f"alpha_pattern key {str(key)[:80]!r} is not a module name (letters, digits, '_' and '.'); "
                "wanlora matches module names literally and never runs a pattern read from a file. Fix: "
                "re-save the LoRA with full module names in alpha_pattern (peft writes those)"
            )
        if module == key or module.endswith("." + key):
            return value
    return None


def _alpha_for(module: str, rank: int, metadata: Mapping[str, str], rank_if_absent: bool) -> float:
    """Alpha of one module of a peft-named file: diffusers' adapter config first, then our
    lineage entries, then (only for files made elsewhere) diffusers' own default alpha = rank.

    Our checkpoints always name their alpha; one that does not is an error, because guessing
    would silently rescale the LoRA.
    """
    cfg = _adapter_config(metadata)
    if cfg:
        alpha = _pattern_value(module, cfg.get("alpha_pattern") or {})
        return float(alpha if alpha is not None else cfg["lora_alpha"])
    if "wanlora.alpha" in metadata:
        return float(metadata["wanlora.alpha"])
    if rank_if_absent:
        return float(rank)
    raise LoraFormatError(
        "the file names no LoRA alpha (neither diffusers' 'lora_adapter_metadata' nor 'wanlora.alpha' "
        "in its header); it was not written by wanlora or diffusers' save_lora_weights"
    )


# ---------------------------------------------------------------------------------- readers
def _group(keys: list[str], prefix: str, ups: tuple[str, ...], downs: tuple[str, ...]) -> tuple[dict, list[str]]:
    """Split `<prefix><module>.<part>` keys into {module: {part-kind: key}}; unknown keys listed."""
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
        if not key.startswith(prefix):
            unknown.append(key)
            continue
        rest = key[len(prefix) :]
        for suffix, kind in [*((s, "up") for s in ups), *((s, "down") for s in downs), (".alpha", "alpha")]:
            if rest.endswith(suffix):
                groups.setdefault(rest[: -len(suffix)], {})[kind] = key
                break
        else:
            unknown.append(key)
    return groups, unknown


def _unknown_error(unknown: list[str], what: str) -> LoraFormatError:
    shown = "\n  ".join(sorted(unknown)[:40])
    more = f"\n  ... and {len(unknown) - 40} more" if len(unknown) > 40 else ""
    return LoraFormatError(f"{len(unknown)} key(s) that are not {what}:\n  {shown}{more}")


def _build(groups: dict, unknown: list[str], sd: Mapping[str, torch.Tensor], rename, alpha_of, what: str) -> Lora:
    """Neutral form of grouped keys; every key that cannot be placed is reported at once."""
    lora: Lora = {}
    unknown = list(unknown)
    for module, parts in sorted(groups.items()):
        name = rename(module)
        if name is None or "up" not in parts or "down" not in parts:
            unknown += sorted(parts.values())
            continue
        down, up = sd[parts["down"]], sd[parts["up"]]
        if up.shape[1] != down.shape[0]:
            raise LoraFormatError(f"{module}: up {tuple(up.shape)} and down {tuple(down.shape)} ranks differ")
        alpha = float(sd[parts["alpha"]].item()) if "alpha" in parts else alpha_of(name, int(down.shape[0]))
        lora[name] = LoraModule(down=down, up=up, alpha=alpha)
    if unknown:
        raise _unknown_error(unknown, what)
    return lora


def read_ours(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], rank_if_absent: bool = False) -> Lora:
    """Our training output (and the diffusers export): peft keys with the `transformer.` prefix.

    `rank_if_absent`: a file from elsewhere without alpha metadata gets alpha = rank, as diffusers
    loads it; for our own checkpoints a missing alpha is an error."""
    groups, unknown = _group(list(sd), OURS_PREFIX, (".lora_B.weight",), (".lora_A.weight",))
    return _build(groups, unknown, sd, lambda m: m, lambda m, r: _alpha_for(m, r, metadata, rank_if_absent),
                  "peft LoRA keys 'transformer.<module>.lora_{A,B}.weight'")


def read_native(sd: Mapping[str, torch.Tensor], prefix: str = NATIVE_PREFIX) -> Lora:
    """ComfyUI / AI Toolkit files: native Wan names, lora_A/B or lora_down/up, optional `.alpha`.

    A missing alpha means alpha = rank (scale 1), which is what ComfyUI and AI Toolkit assume.
    """
    ups, downs = (".lora_up.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_A.weight")
    groups, unknown = _group(list(sd), prefix, ups, downs)
    return _build(groups, unknown, sd, from_native_name, lambda m, r: float(r),
                  f"LoRA keys of native Wan layers '{prefix}<module>.lora_down/lora_up/alpha'")


def read_kohya(sd: Mapping[str, torch.Tensor]) -> Lora:
    """musubi-tuner files: `lora_unet_<native name with _>.lora_down/up.weight` + `.alpha`."""
    groups, unknown = _group(list(sd), KOHYA_PREFIX, (".lora_up.weight",), (".lora_down.weight",))
    return _build(groups, unknown, sd, _from_kohya_name, lambda m, r: float(r),
                  "musubi-tuner keys of Wan layers 'lora_unet_<module>.lora_down/lora_up/alpha'")


def detect_format(keys: list[str]) -> str:
    """'ours', 'native' or 'kohya' from the key prefixes; a mix or anything else is an error."""
    kinds = {
        "ours" if k.startswith(OURS_PREFIX)
        else "native" if k.startswith(NATIVE_PREFIX)
        else "kohya" if k.startswith(KOHYA_PREFIX)
        else "unknown"
        for k in keys
    }
    if len(kinds) != 1 or "unknown" in kinds:
        odd = [k for k in keys if not k.startswith((OURS_PREFIX, NATIVE_PREFIX, KOHYA_PREFIX))]
        raise LoraFormatError(
            "not a Wan LoRA in a known format (keys must all start with 'transformer.', 'diffusion_model.' "
            f"or 'lora_unet_'); found {sorted(kinds)}"
            + (f"; unknown keys: {', '.join(sorted(odd)[:20])}" if odd else "")
        )
    return kinds.pop()


# ---------------------------------------------------------------------------------- writers
def write_ours(lora: Lora) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """peft keys plus diffusers' adapter metadata, so `load_lora_weights` applies the right scale.

    Uniform rank/alpha go in r/lora_alpha; differing ones (imports can have them) in peft's
    rank_pattern/alpha_pattern keyed by full module name.
    """
    sd: dict[str, torch.Tensor] = {}
    for module, m in lora.items():
        sd[f"{OURS_PREFIX}{module}.lora_A.weight"] = m.down
        sd[f"{OURS_PREFIX}{module}.lora_B.weight"] = m.up
    ranks = {m.rank for m in lora.values()}
    alphas = {m.alpha for m in lora.values()}
    r = max(ranks, key=lambda v: sum(m.rank == v for m in lora.values()))
    a = max(alphas, key=lambda v: sum(m.alpha == v for m in lora.values()))
    cfg = {
        "r": r,
        "lora_alpha": a,
        "rank_pattern": {k: m.rank for k, m in lora.items() if m.rank != r},
        "alpha_pattern": {k: m.alpha for k, m in lora.items() if m.alpha != a},
        "target_modules": sorted(lora),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "peft_type": "LORA",
    }
    meta = {DIFFUSERS_METADATA_KEY: json.dumps({OURS_PREFIX + k: v for k, v in cfg.items()}, sort_keys=True)}
    return sd, meta


def _alpha_tensor(m: LoraModule) -> torch.Tensor:
    return torch.tensor(m.alpha, dtype=torch.float32)


def write_comfy(lora: Lora) -> dict[str, torch.Tensor]:
    """ComfyUI's native form; lora_down/lora_up is the spelling every ComfyUI version reads."""
    sd: dict[str, torch.Tensor] = {}
    for module, m in lora.items():
        base = NATIVE_PREFIX + to_native_name(module)
        sd[f"{base}.lora_down.weight"] = m.down
        sd[f"{base}.lora_up.weight"] = m.up
        sd[f"{base}.alpha"] = _alpha_tensor(m)
    return sd


def write_musubi(lora: Lora) -> dict[str, torch.Tensor]:
    """musubi-tuner's kohya form (what its loader and its ComfyUI converter read)."""
    sd: dict[str, torch.Tensor] = {}
    for module, m in lora.items():
        base = KOHYA_PREFIX + to_native_name(module).replace(".", "_")
        sd[f"{base}.lora_down.weight"] = m.down
        sd[f"{base}.lora_up.weight"] = m.up
        sd[f"{base}.alpha"] = _alpha_tensor(m)
    return sd


def folded_state_dict(lora: Lora) -> dict[str, torch.Tensor]:
    """peft keys with alpha/rank folded into `up`: loads with the right scale even where no
    metadata can travel (a state dict handed to `load_lora_weights`, which then assumes alpha = rank)."""
    sd: dict[str, torch.Tensor] = {}
    for module, m in lora.items():
        sd[f"{OURS_PREFIX}{module}.lora_A.weight"] = m.down
        sd[f"{OURS_PREFIX}{module}.lora_B.weight"] = (m.up.float() * m.scale).to(m.up.dtype)
    return sd


# ------------------------------------------------------------------------------- base check
def base_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Weight shape of every module of a Wan transformer config, without allocating it (meta device)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(dict(config))
    return {
        name: tuple(mod.weight.shape)
        for name, mod in model.named_modules()
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv3d))
    }


def check_against_base(lora: Lora, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Every module must exist in the base with matching in/out sizes; one error lists all misfits.

    This is what rejects a LoRA made for another base model (Wan 2.1 1.3B, the 5B, ...): the
    names often coincide, the sizes do not.
    """
    problems = []
    for module, m in sorted(lora.items()):
        shape = shapes.get(module)
        if shape is None:
            problems.append(f"{module}: not a layer of the base model")
            continue
        out_f, in_f, *kernel = shape
        down_ok = m.down.shape[1] == in_f and tuple(m.down.shape[2:]) == tuple(kernel)
        if not down_ok or m.up.shape[0] != out_f:
            problems.append(
                f"{module}: LoRA takes {m.down.shape[1]} inputs to {m.up.shape[0]} outputs"
                f"{f' (kernel {tuple(m.down.shape[2:])})' if kernel else ''}, the base layer "
                f"{in_f} to {out_f}{f' (kernel {tuple(kernel)})' if kernel else ''}"
            )
    if problems:
        listing = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
        raise LoraFormatError(
            f"{source}: does not fit the base model ({len(problems)} layer(s)); it was made for another "
            f"model or size:\n  {listing}"
        )


def load_base_config(name_or_path: str, revision: str = "main") -> dict[str, Any]:
    """The high-noise expert's transformer config (both experts share the architecture).

    Accepts a diffusers pipeline folder, a transformer folder, or a hub id (only config.json is fetched).
    """
    path = Path(name_or_path)
    for candidate in (path / "transformer" / "config.json", path / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    if path.exists():
        raise LoraFormatError(f"{path}: no transformer/config.json inside; point at a diffusers Wan folder")
    from huggingface_hub import hf_hub_download

    file = hf_hub_download(name_or_path, "config.json", subfolder="transformer", revision=revision)
    return json.loads(Path(file).read_text(encoding="utf-8"))
