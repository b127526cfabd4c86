"""Which Wan 2.2 model a folder holds, and everything that differs between the three: the one owner.

Wan 2.2 ships three diffusers releases that wanlora trains through one code path:

| variant | transformers (experts) | boundary | transformer input | VAE | buckets | fps |
|---|---|---|---|---|---|---|
| `t2v-a14b` | transformer/, transformer_2/ | 0.875 | 16 = noisy latent | Wan 2.1 (16 ch, 8x) | 16 px | 16 |
| `i2v-a14b` | transformer/, transformer_2/ | 0.9 | 36 = noisy latent 16 + mask 4 + image latent 16 | Wan 2.1 (16 ch, 8x) | 16 px | 16 |
| `ti2v-5b` | transformer/ only | none | 48 = latent (first frame clean for I2V) | Wan 2.2 (48 ch, 16x) | 32 px | 24 |

Code that needs to know asks the `Variant` (never `in_channels == 36` scattered around), and the
variant is read from the folder (`detect_variant`: `model_index.json` plus the transformer's and
the VAE's configs), so `model.variant: auto` is right for every official release; an explicit
`model.variant` that disagrees with the folder is refused naming both (`resolve_variant`).

Files made for one variant carry its name (cache index, LoRA header: `VARIANT_KEY`); a file
without it was made before the switch existed, by the only variant there was, `t2v-a14b`
(`recorded_variant`), so old T2V caches and LoRAs stay valid byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from wanlora.errors import UserError

VariantName = Literal["t2v-a14b", "i2v-a14b", "ti2v-5b"]
VARIANT_NAMES: tuple[VariantName, ...] = get_args(VariantName)
#: Header / index key naming the variant a file was made for.
VARIANT_KEY = "wanlora.variant"
#: What a file without `VARIANT_KEY` was made for: the only variant before the switch.
LEGACY_VARIANT: VariantName = "t2v-a14b"


class VariantError(UserError, ValueError):
    """A model, cache, LoRA or export made for one Wan 2.2 variant met another; the message says
    which, how they differ and what to do."""


@dataclass(frozen=True)
class Variant:
    """What differs between the Wan 2.2 releases (see the module table).

    name: params spelling (`model.variant`). label: as people write it. hub_id: the official
    diffusers release, the default `model.name_or_path` of `wanlora init --variant`.
    pipeline: the diffusers pipeline class that samples it. experts: expert names in order of
    noise (high first), each trained as its own LoRA; folders: the diffusers subfolder of each.
    boundary: the default expert switch as a share of 1000 timesteps (model_index.json's
    boundary_ratio wins); None with one transformer. in_channels: the transformer's input
    channels; latent_channels: the VAE's z_dim, also the transformer's output; the difference is
    the condition (I2V A14B: a 4-channel frame mask and the 16-channel VAE latent of the start
    image followed by zeros, as `WanImageToVideoPipeline.prepare_latents` builds it).
    spatial_factor / temporal_factor: VAE down-sampling; bucket_align: pixels a bucket side must be
    a multiple of (VAE factor x patch 2). fps: the frame rate it was trained at. image_condition:
    the transformer needs a start image; expand_timesteps: per-token timesteps (TI2V-5B keeps the
    first latent frame clean at t = 0).
    """

    name: VariantName
    label: str
    hub_id: str
    pipeline: Literal["WanPipeline", "WanImageToVideoPipeline"]
    experts: tuple[str, ...]
    folders: tuple[str, ...]
    boundary: float | None
    in_channels: int
    latent_channels: int
    spatial_factor: int
    temporal_factor: int
    bucket_align: int
    fps: int
    image_condition: bool
    expand_timesteps: bool

    @property
    def condition_channels(self) -> int:
        """Channels the transformer takes beside the noisy latent (I2V A14B: 4 mask + 16 image)."""
        return self.in_channels - self.latent_channels

    def describe(self) -> str:
        """One line naming what a mismatch message must show: channels, dims, expert count."""
        cond = (f" = {self.latent_channels} latent + {self.temporal_factor} mask + "
                f"{self.condition_channels - self.temporal_factor} start-image latent" if self.condition_channels else "")
        experts = f"{len(self.experts)} experts, boundary {self.boundary}" if len(self.experts) > 1 else "one transformer"
        return (f"{self.name} ({self.label}: {self.in_channels} input channels{cond}, {self.latent_channels}-channel "
                f"VAE at {self.spatial_factor}x, {experts})")


VARIANTS: dict[VariantName, Variant] = {
    "t2v-a14b": Variant(
        "t2v-a14b", "Wan 2.2 T2V A14B", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "WanPipeline",
        ("high", "low"), ("transformer", "transformer_2"), 0.875,
        in_channels=16, latent_channels=16, spatial_factor=8, temporal_factor=4, bucket_align=16, fps=16,
        image_condition=False, expand_timesteps=False,
    ),
    "i2v-a14b": Variant(
        "i2v-a14b", "Wan 2.2 I2V A14B", "Wan-AI/Wan2.2-I2V-A14B-Diffusers", "WanImageToVideoPipeline",
        ("high", "low"), ("transformer", "transformer_2"), 0.9,
        in_channels=36, latent_channels=16, spatial_factor=8, temporal_factor=4, bucket_align=16, fps=16,
        image_condition=True, expand_timesteps=False,
    ),
    "ti2v-5b": Variant(
        "ti2v-5b", "Wan 2.2 TI2V 5B", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "WanPipeline",
        ("main",), ("transformer",), None,
        in_channels=48, latent_channels=48, spatial_factor=16, temporal_factor=4, bucket_align=32, fps=24,
        image_condition=False, expand_timesteps=True,
    ),
}


def expert_label(expert: str) -> str:
    """How messages name an expert: 'high-noise expert', or 'transformer' for TI2V 5B's one."""
    return "transformer" if expert == "main" else f"{expert}-noise expert"


def get_variant(name: str) -> Variant:
    """The variant of a params / CLI spelling; an unknown one is refused listing the three."""
    if name not in VARIANTS:
        raise VariantError(f"unknown Wan 2.2 variant {name!r}: use one of {', '.join(VARIANT_NAMES)}")
    return VARIANTS[name]  # type: ignore[index]


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VariantError(f"{path}: missing, so the Wan 2.2 variant cannot be read. Fix: download "
                           f"{path.parent.name if path.name != 'model_index.json' else 'the model'} again") from None
    except (OSError, ValueError) as err:
        raise VariantError(f"{path}: unreadable ({err}). Fix: download it again") from None
    if not isinstance(data, dict):
        raise VariantError(f"{path}: not a JSON object. Fix: download it again")
    return data


def _part_present(index: dict[str, Any], part: str) -> bool:
    """model_index.json lists a part as [library, class]; an absent part is [null, null] or missing."""
    entry = index.get(part)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def detect_variant(model_dir: str | Path) -> Variant:
    """The variant of a diffusers folder, from `model_index.json` (second expert, boundary_ratio,
    expand_timesteps) and the configs of `transformer/` (in_channels) and `vae/` (z_dim).

    36 input channels is I2V A14B (16 noisy + 20 condition); a 48-channel VAE or expand_timesteps
    is TI2V-5B; 16 channels with a second expert is T2V A14B. Anything else (Wan 2.1, a
    half-copied folder, a second expert of another width) is refused naming what was found.
    """
    root = Path(model_dir)
    index = _json(root / "model_index.json")
    transformer = _json(root / "transformer" / "config.json")
    vae = _json(root / "vae" / "config.json")
    in_ch, out_ch, z_dim = transformer.get("in_channels"), transformer.get("out_channels"), vae.get("z_dim")
    two = _part_present(index, "transformer_2")
    found = (f"in_channels {in_ch}, out_channels {out_ch}, VAE z_dim {z_dim}, "
             f"{'two transformers' if two else 'one transformer'}, boundary_ratio {index.get('boundary_ratio')}, "
             f"expand_timesteps {bool(index.get('expand_timesteps'))}")
    if two:
        second = _json(root / "transformer_2" / "config.json")
        if second.get("in_channels") != in_ch:
            raise VariantError(
                f"{root}: transformer/ takes {in_ch} channels but transformer_2/ takes {second.get('in_channels')}: "
                "the two experts come from different models. Fix: download both experts of one release")
    for v in VARIANTS.values():
        if (in_ch, out_ch, z_dim) == (v.in_channels, v.latent_channels, v.latent_channels) and two == (len(v.experts) > 1) \
                and bool(index.get("expand_timesteps")) == v.expand_timesteps:
            return v
    if transformer.get("image_dim") is not None:
        found += f", image_dim {transformer.get('image_dim')} (a CLIP image encoder: Wan 2.1 I2V)"
    raise VariantError(
        f"{root}: not a Wan 2.2 model wanlora trains ({found}). Fix: point model.name_or_path at one of "
        + ", ".join(f"{v.hub_id} ({v.name})" for v in VARIANTS.values())
    )


def resolve_variant(setting: str, model_dir: str | Path) -> Variant:
    """`model.variant` against the folder: `auto` takes what the folder holds; an explicit name
    must agree with it (training an I2V LoRA on a T2V base would run, and the LoRA fit nothing)."""
    found = detect_variant(model_dir)
    if setting == "auto" or setting == found.name:
        return found
    wanted = get_variant(setting)
    raise VariantError(
        f"model.variant is {wanted.name}, but {model_dir} holds {found.describe()}; "
        f"{wanted.name} is {wanted.describe()}. Fix: set model.variant: auto (or {found.name}), or point "
        f"model.name_or_path at {wanted.hub_id}"
    )


def variant_of_config(config: dict[str, Any]) -> Variant | None:
    """The variant whose experts have this transformer config's input width (None: no Wan 2.2 one)."""
    return next((v for v in VARIANTS.values() if v.in_channels == config.get("in_channels")), None)


def recorded_variant(metadata: dict[str, Any] | None) -> str:
    """The variant a cache index or file header says it was made for (`LEGACY_VARIANT` when silent)."""
    value = (metadata or {}).get(VARIANT_KEY, (metadata or {}).get("variant"))
    return str(value) if value else LEGACY_VARIANT


def refuse_other_variant(what: str, made_for: str, current: Variant, fix: str) -> None:
    """Stop when `what` (a cache, a LoRA, an export) was made for another variant than `current`,
    naming both variants' channels, dims and experts, and the fix."""
    if made_for == current.name:
        return
    other = VARIANTS.get(made_for)  # type: ignore[call-overload]
    was = other.describe() if other else repr(made_for)
    raise VariantError(f"{what}: made for {was}, but the model is {current.describe()}. {fix}")
