"""Bringing LoRAs made elsewhere (AI Toolkit, musubi-tuner, ComfyUI files) into our format.

AI Toolkit saves Wan 2.2 LoRAs in native Wan names with peft spelling and no alpha
(`diffusion_model.blocks.0.self_attn.q.lora_A.weight`; its alpha is always the rank), one file per
expert (`<name>_high_noise.safetensors`, `<name>_low_noise.safetensors`), or, with split files off,
one combined file whose keys carry `.transformer_1.` (high noise) / `.transformer_2.` (low noise).
musubi-tuner writes kohya names with alphas, one expert per file. An import is checked against the
base model's shapes, so a LoRA for another Wan (2.1, 5B, I2V) is refused instead of half-applied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wanlora import tensorfiles
from wanlora.config import Expert
from wanlora.export import formats
from wanlora.export.formats import Lora, LoraFormatError
from wanlora.io import sha256_file
from wanlora.models.variant import VARIANT_KEY, refuse_other_variant, variant_of_config

_AITK_EXPERT = {e: f".{name}." for e, name in formats.AITK_EXPERTS.items()}
#: Header keys of a foreign file that an import keeps (in `wanlora.imported_metadata`): what names
#: the file's origin and shape. Everything else stays behind: trainers write dataset folders and
#: tag counts (`ss_dataset_dirs`, `ss_tag_frequency`), absolute model and output paths, prompts,
#: and a foreign `wanlora.*` lineage that describes someone else's workspace. The same idea as AI
#: Toolkit's `ui_scripts/merge_loras.py`, which keeps only version, format, ss_base_model_version
#: and software; `name` is the `meta.name` of an AI Toolkit job config.
FOREIGN_KEYS = frozenset({
    "name", "format", "version", "software", "training_info", "ss_base_model_version", "ss_output_name",
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "modelspec.architecture", "modelspec.title",
})
FOREIGN_VALUE_LIMIT = 1024  # characters; a longer value is not a name or a version


def foreign_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The allowlisted, short entries of a foreign header (see FOREIGN_KEYS)."""
    return {k: v for k, v in sorted(metadata.items())
            if k in FOREIGN_KEYS and isinstance(v, str) and len(v) <= FOREIGN_VALUE_LIMIT}


def expert_from_name(path: Path) -> Expert | None:
    """AI Toolkit's and common naming: `..._high_noise.safetensors` / `..._low_noise.safetensors`."""
    stem = path.stem.lower()
    if re.search(r"(^|[_.-])high([_-]?noise)?$", stem):
        return "high"
    if re.search(r"(^|[_.-])low([_-]?noise)?$", stem):
        return "low"
    return None


def _split_combined(sd: dict[str, torch.Tensor], expert: Expert | None, path: Path) -> dict[str, torch.Tensor]:
    """Pick one expert's keys out of an AI Toolkit combined file and drop the marker."""
    marked = {e: [k for k in sd if m in k] for e, m in _AITK_EXPERT.items()}
    if not any(marked.values()):
        return sd
    if expert is None:
        raise LoraFormatError(
            f"{path}: holds both experts (AI Toolkit combined file); say which one to import "
            "(expert='high' for transformer_1, 'low' for transformer_2)"
        )
    marker = _AITK_EXPERT[expert]
    unmarked = [k for k in sd if not any(m in k for m in _AITK_EXPERT.values())]
    if unmarked:
        raise LoraFormatError(f"{path}: keys without an expert marker in a combined file: {unmarked[:10]}")
    return {k.replace(marker, "."): v for k, v in sd.items() if marker in k}


def read_lora(path: Path, expert: Expert | None = None, foreign: bool = False) -> tuple[Lora, dict[str, str], str]:
    """(Lora, header metadata, format) of any supported file: 'ours', 'native' or 'kohya'.

    `foreign`: made by another tool, so a peft-named file without alpha metadata means alpha = rank."""
    sd, metadata = tensorfiles.load(path, formats.LoraFormatError)
    if not sd:
        raise LoraFormatError(f"{path}: holds no tensors")
    fmt = formats.detect_format(list(sd))
    try:
        if fmt == "ours":
            lora = formats.read_ours(sd, metadata, rank_if_absent=foreign)
        elif fmt == "native":
            lora = formats.read_native(_split_combined(sd, expert, path))
        else:
            lora = formats.read_kohya(sd)
    except LoraFormatError as err:
        raise LoraFormatError(f"{path}: {err}") from None
    return lora, metadata, fmt


def import_lora(
    path: Path, base_config: Mapping[str, Any], expert: Expert | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A peer's LoRA file as our state dict (peft keys) + metadata, checked against the base model.

    `expert` picks one half of an AI Toolkit combined file; otherwise it is read from the file
    name when it says high/low noise, and recorded in the metadata.
    """
    path = Path(path)
    lora, source_meta, fmt = read_lora(path, expert, foreign=True)
    base = variant_of_config(base_config)
    if base is not None and VARIANT_KEY in source_meta:  # T2V and I2V A14B LoRAs have the same shapes
        refuse_other_variant(str(path), source_meta[VARIANT_KEY], base,
                             "Fix: import it with the model it was trained for (--model)")
    formats.check_against_base(lora, formats.base_shapes(base_config), str(path))
    sd, meta = formats.write_ours(lora)
    meta.update(
        {
            "wanlora.imported_from": path.name,
            "wanlora.imported_sha256": sha256_file(path),
            "wanlora.imported_format": {"ours": "wanlora/diffusers", "native": "comfyui/ai-toolkit",
                                        "kohya": "musubi-tuner"}[fmt],
            "wanlora.imported_metadata": json.dumps(foreign_metadata(source_meta), sort_keys=True),
        }
    )
    if base is not None:
        meta[VARIANT_KEY] = base.name  # checked against this base: evaluate and export hold it to it
    found = expert or expert_from_name(path)
    if found:
        meta["wanlora.expert"] = found
    return sd, meta


def import_to_file(src: Path, dst: Path, base_config: Mapping[str, Any], expert: Expert | None = None) -> Path:
    """`import_lora`, written as a wanlora/diffusers file at `dst` (what `wanlora import-lora` does)."""
    sd, meta = import_lora(Path(src), base_config, expert)
    tensorfiles.save(Path(dst), sd, meta)
    return Path(dst)
