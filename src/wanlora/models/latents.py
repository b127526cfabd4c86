"""Stage latent_cache: every training sample's frames encoded by the Wan VAE once.

A sample (data/buckets/samples.jsonl) names source frames, a crop, a bucket size and a flip.
`load_frames` turns it into pixels exactly one way (decode those frames upright, crop, resize with
area averaging when shrinking, flip, scale to [-1, 1]); `encode_frames` turns pixels into the
VAE's Gaussian. The trainer uses the same two functions when a dataset is not cached, so cached
and uncached training see identical latents.

Normalisation: the cache stores the VAE's *raw* distribution (mean and logvar, or the mode),
exactly what `vae.encode` returns. The trainer draws z = mean + exp(logvar / 2) * eps (see
`draw_latent`) and then calls `normalize_latents(z, vae_config)` = (z - latents_mean) /
latents_std per channel, which is the space the transformer works in (WanPipeline's decode path
undoes it with `denormalize_latents` before `vae.decode`). Storing raw values keeps the cache a
plain function of the VAE, lets the noise be drawn in the space the VAE defined, and leaves the
constants in one place (vae/config.json).

Contract: `<out>/<key>.safetensors` with `mean` and `logvar` [16, F', H/8, W/8] (distribution)
or `latent` (mode), and for I2V A14B `condition` (the start-image condition latent, raw mode, same
shape); metadata vae, sample_id, bucket, dtype, mode, sha256, frames, and variant unless T2V;
`<out>/index.json` maps sample id -> key and records the VAE identity. The key covers the
source bytes, frames, crop, size, flip, VAE identity, mode and dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from rich.progress import track

from wanlora.errors import rebuild_fix
from wanlora.io import atomic_write_json, dataset_file, read_jsonl, sha256_json
from wanlora.report import Problem, settle, write_problems
from wanlora.models.cachefiles import (
    INDEX,
    CacheError,
    free,
    item_path,
    read_index,
    read_item,
    remove_stale,
    restore,
    save_item,
)
from wanlora.models.condition import check_last_frame, condition_pixels
from wanlora.models.geometry import TEMPORAL_FACTOR, latent_shape
from wanlora.models.loading import load_vae, model_identity, to_dtype
from wanlora.models.variant import LEGACY_VARIANT, VARIANTS, Variant, recorded_variant, refuse_other_variant

#: Frames larger than this (in pixels) are encoded in overlapping tiles to bound VAE memory.
#: Up to 720p the Wan VAE encodes whole frames on a 24 GB card; tiles change the last bits.
TILING_MIN_PIXELS = 1280 * 720
_KEY_FIELDS = ("id", "sha256", "kind", "frame_indices", "crop", "width", "height", "flip")
_RERUN = rebuild_fix("latent_cache")
_REBUCKET = "Fix: rerun the bucket stage (`dvc repro bucket`)"


def _check_frame_count(n: int, what: str) -> None:
    if n < 1 or (n - 1) % TEMPORAL_FACTOR:
        near = max(1, ((n - 1) // TEMPORAL_FACTOR) * TEMPORAL_FACTOR + 1)
        raise ValueError(
            f"{what}: {n} frames, but the Wan VAE needs 4n+1 (1, 5, 9, ..., 81) and would silently "
            f"drop the rest; use {near} frames (datasets.<name>.bucket.num_frames)"
        )


# ------------------------------------------------------------------------------- pixels
def load_frames(sample: Mapping[str, Any], workspace: str | Path) -> torch.Tensor:
    """The sample's pixels as float32 [C, F, H, W] in [-1, 1]: its source frames decoded
    upright, cropped to `crop`, resized to the bucket (area averaging when shrinking, bicubic when
    enlarging), mirrored when `flip`."""
    from wanlora.media.decode import read_frames
    from wanlora.media.probe import probe

    sid = sample["id"]
    indices = list(sample["frame_indices"])
    _check_frame_count(len(indices), f"sample {sid}")
    if len(indices) != sample["num_frames"]:
        raise ValueError(f"sample {sid}: {len(indices)} frame_indices but num_frames={sample['num_frames']}. {_REBUCKET}")
    path = Path(workspace) / sample["path"]
    info = probe(path)
    x, y, w, h = sample["crop"]
    if x < 0 or y < 0 or w < 1 or h < 1 or x + w > info.width or y + h > info.height:
        raise ValueError(
            f"sample {sid}: crop {sample['crop']} lies outside the {info.width}x{info.height} "
            f"frames of {path}. {_REBUCKET}"
        )
    size = (int(sample["width"]), int(sample["height"]))
    interp = cv2.INTER_AREA if w >= size[0] and h >= size[1] else cv2.INTER_CUBIC

    def fit(frame: np.ndarray) -> np.ndarray:  # applied as each frame is decoded: memory follows the bucket
        return cv2.resize(np.ascontiguousarray(frame[y : y + h, x : x + w]), size, interpolation=interp)

    out = read_frames(path, indices, info, transform=fit)  # [F, h, w, 3] uint8 RGB, displayed orientation
    if sample.get("flip"):
        out = out[:, :, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(out)).permute(3, 0, 1, 2).float()
    return pixels / 127.5 - 1.0



@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of the VAE posterior of [C, F, H, W] (or batched [B, C, F, H, W]) pixels
    in [-1, 1], on the VAE's device and dtype. Refuses a frame count that is not 4n+1, which the
    VAE itself would silently truncate."""
    batched = frames.dim() == 5
    x = frames if batched else frames.unsqueeze(0)
    _check_frame_count(x.shape[2], "encode_frames")
    param = next(vae.parameters())
    dist = vae.encode(x.to(param.device, param.dtype)).latent_dist
    mean, logvar = dist.mean, dist.logvar
    return (mean, logvar) if batched else (mean[0], logvar[0])


# -------------------------------------------------------------------------- normalisation
def _stats(latents: torch.Tensor, vae_config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    channels = len(vae_config["latents_mean"])
    if latents.dim() < 4 or latents.shape[-4] != channels:
        raise ValueError(f"latents {tuple(latents.shape)}: expected [..., {channels}, F, H, W]")
    shape = (channels, 1, 1, 1)
    mean = torch.tensor(vae_config["latents_mean"]).view(shape).to(latents.device, latents.dtype)
    std = torch.tensor(vae_config["latents_std"]).view(shape).to(latents.device, latents.dtype)
    return mean, std


def normalize_latents(latents: torch.Tensor, vae_config: Mapping[str, Any]) -> torch.Tensor:
    """Raw VAE latents -> the transformer's space: (z - latents_mean) / latents_std per channel."""
    mean, std = _stats(latents, vae_config)
    return (latents - mean) / std


def denormalize_latents(latents: torch.Tensor, vae_config: Mapping[str, Any]) -> torch.Tensor:
    """The transformer's space -> raw VAE latents (WanPipeline does this before vae.decode)."""
    mean, std = _stats(latents, vae_config)
    return latents * std + mean


def draw_latent(cached: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """A raw latent from a cache entry: the stored mode, or a sample of the stored Gaussian."""
    if "latent" in cached:
        return cached["latent"]
    mean, logvar = cached["mean"], cached["logvar"]
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return mean + torch.exp(0.5 * logvar.float()).to(mean.dtype) * eps.to(mean.dtype)


# --------------------------------------------------------------------------------- stage
def variant_fields(variant: Variant, last_frame: bool = False) -> dict[str, str]:
    """What the cache records of the variant: nothing for T2V A14B (caches made before the variant
    switch are T2V caches, and stay valid byte for byte), its name for the others, whose items
    hold more than the latent (I2V: the start image's condition latent), and `last_frame` when the
    condition holds the last frame too (`train.last_frame`)."""
    fields = {} if variant.name == LEGACY_VARIANT else {"variant": variant.name}
    return fields | ({"last_frame": "1"} if last_frame else {})


def sample_key(sample: Mapping[str, Any], vae: str, mode: str, dtype: str,
               variant: Variant = VARIANTS[LEGACY_VARIANT], last_frame: bool = False) -> str:
    """File stem of a sample's latents: changes whenever its pixels or the encoding could (the
    variant too: I2V A14B shares T2V's VAE but its items carry the condition latent)."""
    return sha256_json({"sample": {k: sample.get(k) for k in _KEY_FIELDS}, "vae": vae, "mode": mode, "dtype": dtype,
                        **variant_fields(variant, last_frame)})


def encode_sample(vae, sample: Mapping[str, Any], workspace: Path, mode: str,
                  variant: Variant = VARIANTS[LEGACY_VARIANT], last_frame: bool = False) -> dict[str, torch.Tensor]:
    """One sample's latents as the cache stores them (CPU tensors), tiling large frames. The
    trainer's on-the-fly encoding calls it too, so cached and uncached datasets see the same latents.
    An I2V variant adds `condition`: the raw VAE mode of the condition video (the sample's first
    frame, with `last_frame` its last one too, zeros between: `wanlora.models.condition`), which
    the trainer normalises like the latent."""
    pixels = load_frames(sample, workspace)
    _, frames, height, width = pixels.shape
    latent_shape(frames, height, width)  # checks the bucket's sides before the VAE sees them
    if height * width > TILING_MIN_PIXELS:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    mean, logvar = encode_frames(vae, pixels)
    out = {"latent": mean.cpu()} if mode == "mode" else {"mean": mean.cpu(), "logvar": logvar.cpu()}
    if variant.image_condition:
        out["condition"] = encode_frames(vae, condition_pixels(pixels, last_frame))[0].cpu()
    return out


def run_stage(
    root: Path,
    samples_manifest: Path,
    workspace: Path,
    out_dir: Path,
    mode: Literal["distribution", "mode"],
    dtype: str,
    device: str,
    enabled_datasets: set[str],
    folders: Mapping[str, str],
    store: Path | None = None,
    variant: Variant = VARIANTS[LEGACY_VARIANT],
    last_frame: bool = False,
) -> None:
    """Encode the samples of `enabled_datasets` that have no valid cache file, remove files no
    longer needed, write index.json. `folders` (dataset name -> folder) confines the files read:
    a sample whose path leaves its dataset folder stops the stage (`dataset_file`)."""
    if mode not in ("distribution", "mode"):
        raise ValueError(f"latent mode {mode!r}: use 'distribution' or 'mode'")
    check_last_frame(last_frame, variant)
    out_dir, workspace = Path(out_dir), Path(workspace)
    samples = [s for s in read_jsonl(samples_manifest) if s["dataset"] in enabled_datasets]
    for s in samples:
        dataset_file(workspace, folders[s["dataset"]], s["path"], f"{samples_manifest}: sample {s['id']}")
    vae_id = model_identity(root, "vae")
    tag = variant_fields(variant, last_frame)
    keys = {s["id"]: sample_key(s, vae_id, mode, dtype, variant, last_frame) for s in samples}
    todo = [s for s in samples if not restore(out_dir, store, keys[s["id"]], vae=vae_id, **tag)]

    problems: list[Problem] = []
    if todo:
        vae = load_vae(root, to_dtype(dtype), device)
        try:
            for s in track(todo, description=f"latent_cache: encoding {len(todo)} sample(s)"):
                try:
                    tensors = encode_sample(vae, s, workspace, mode, variant, last_frame)
                except (ValueError, OSError) as err:  # one bad window must not stop the dataset
                    problems.append(Problem(s["path"], f"sample {s['id']} cannot be encoded: {err}",
                                            "re-export the clip, or delete it and rerun `dvc repro`", "latent_cache"))
                    del keys[s["id"]]
                    continue
                meta = {
                    "vae": vae_id, "sample_id": s["id"], "bucket": s["bucket"], "dtype": dtype,
                    "mode": mode, "sha256": s["sha256"], "frames": str(len(s["frame_indices"])), **tag,
                }
                save_item(out_dir, store, keys[s["id"]], tensors, meta)
        finally:
            del vae
            free(device)

    remove_stale(out_dir, set(keys.values()))
    atomic_write_json(out_dir / INDEX, {"vae": vae_id, "mode": mode, "dtype": dtype, **tag, "samples": keys})
    write_problems(out_dir / "problems.json", problems)
    settle(problems, "skip", "latent_cache")  # the trainer reports these samples as uncached, and skips them


def check_variant(index: Mapping[str, Any], cache_dir: Path, variant: Variant, last_frame: bool = False) -> None:
    """A cache made for another variant is refused: I2V A14B and T2V A14B share one VAE, so the VAE
    check alone would let a T2V cache (no condition latents) reach an I2V trainer. So is one whose
    condition latents hold the last frame when `train.last_frame` says otherwise, or the reverse."""
    refuse_other_variant(f"{cache_dir}", recorded_variant(dict(index)), variant, _RERUN)
    if (index.get("last_frame") == "1") != last_frame:
        made = "with" if index.get("last_frame") == "1" else "without"
        raise CacheError(f"{cache_dir}: condition latents made {made} the last frame, but train.last_frame is "
                         f"{str(last_frame).lower()}. {_RERUN}")


def load_latents(cache_dir: str | Path, sample_id: str, expect_vae: str | None = None,
                 variant: Variant | None = None, last_frame: bool = False) -> dict[str, torch.Tensor]:
    """The cached tensors of one sample (`mean`+`logvar`, or `latent`; `condition` for I2V). With
    `expect_vae` (`model_identity(root, "vae")`), a cache made by another VAE is an error; with
    `variant`, one made for another variant."""
    cache_dir = Path(cache_dir)
    index = read_index(cache_dir, _RERUN)
    if expect_vae is not None and index.get("vae") != expect_vae:
        raise CacheError(f"{cache_dir}: made with VAE {index.get('vae')}, but the model now has {expect_vae}. {_RERUN}")
    if variant is not None:
        check_variant(index, cache_dir, variant, last_frame)
    key = index["samples"].get(sample_id)
    if key is None:
        raise CacheError(f"{cache_dir}: no latents for sample {sample_id!r}. {_RERUN}")
    return read_item(item_path(cache_dir, key), _RERUN, sample_id=sample_id, vae=index["vae"])
