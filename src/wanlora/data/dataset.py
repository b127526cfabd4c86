"""The training data: one item per bucketed sample, its caption, and its cached tensors.

Joins `data/buckets/samples.jsonl` (what to train on) with `data/captions/captions.jsonl` (the
caption of each clip) and the caches: latents from `data/cache/latents/` (its index.json, checked
against the current VAE, read through `wanlora.models.latents`), or, for datasets with
`cache_latents: false`, an `encode` callable (frames decoded and VAE-encoded on the fly, the same
two functions the cache stage uses). Text embeddings come from `data/cache/text/` through
`wanlora.models.text`.

Latents are returned in the transformer's space (`normalize_latents`); a 'distribution' cache is
sampled (`draw_latent`) from the trainer's generator each time, so the draw is part of the
reproducible stream.

Held-out clips (`data/split/validation.json`, written by the split stage) are left out here,
every window and flipped copy of them, before anything else sees the list: no batch, no
calibration input and no epoch order can reach a clip the evaluate stage validates on.

Order: each epoch is a permutation from a generator seeded by (seed, epoch); samples are grouped
by bucket in that order and cut into batches, and the batches are permuted again, so a batch never
mixes buckets and the whole order is a pure function of (seed, epoch): resuming needs only the
epoch and the position in it. A bucket with fewer samples than the batch size still trains (with
a smaller batch) and is reported.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanlora.data.split import read_split
from wanlora.io import dataset_file, read_jsonl
from wanlora.models.condition import condition_input
from wanlora.models.latents import INDEX, check_variant, draw_latent, load_latents, normalize_latents
from wanlora.models.variant import LEGACY_VARIANT, VARIANTS, Variant
from wanlora.pipeline import CAPTION_MANIFEST, LATENT_CACHE, SAMPLES, SPLIT_FILE
from wanlora.errors import rebuild_fix
from wanlora.report import InputError, Problem

STAGE = "train"
Encode = Callable[[dict], dict[str, torch.Tensor]]


class CacheMismatch(InputError):
    """A cache that was made for another model or another bucket; the message names the fix."""


@dataclass(frozen=True)
class Item:
    id: str
    bucket: str
    caption: str
    caption_dop: str | None
    cached: bool
    record: dict = field(repr=False, compare=False)


def _latent_index(cache_dir: Path, expect_vae: str | None, variant: Variant, last_frame: bool) -> dict[str, str]:
    """sample_id -> cache key, after checking the cache was made by the current VAE for the
    current variant."""
    path = cache_dir / INDEX
    if not path.is_file():
        return {}
    index = json.loads(path.read_text(encoding="utf-8"))
    if expect_vae is not None and index.get("vae") != expect_vae:
        raise CacheMismatch(
            f"{path}: latent cache made by VAE {index.get('vae')!r}, but the model's VAE is {expect_vae!r} "
            f"(model.name_or_path changed, or its weights?). {rebuild_fix('latent_cache')}"
        )
    check_variant(index, path, variant, last_frame)
    return dict(index.get("samples", {}))


@dataclass
class TrainData:
    """Items plus what is needed to turn one into tensors (see module doc)."""

    items: list[Item]
    problems: list[Problem]
    vae_config: dict
    cache_dir: Path
    expect_vae: str | None = None
    encode: Encode | None = None
    held_out: tuple[str, ...] = ()  # sample ids left out for validation (every window of a held-out clip)
    variant: Variant = VARIANTS[LEGACY_VARIANT]
    last_frame: bool = False  # I2V: the condition holds each sample's last frame too (`train.last_frame`)

    def _tensors(self, i: int) -> dict[str, torch.Tensor]:
        item = self.items[i]
        if item.cached:
            cached = load_latents(self.cache_dir, item.id, self.expect_vae, self.variant, self.last_frame)
        else:
            cached = self.encode(item.record)  # type: ignore[misc]
        return {k: v.float().cpu() for k, v in cached.items()}

    def latent(self, i: int, generator: torch.Generator) -> torch.Tensor:
        """Latent [C, F, H, W] of item `i` in the transformer's space (float32, CPU)."""
        return self.inputs(i, generator)[0]

    def inputs(self, i: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latent, condition) of item `i`: the latent as `latent` gives it, and for an I2V variant
        the condition channels (frame mask + normalised start-image latent, `condition_input`);
        None for T2V. One read of the cache file for both."""
        cached = self._tensors(i)
        latent = normalize_latents(draw_latent(cached, generator), self.vae_config)
        if not self.variant.image_condition:
            return latent, None
        if "condition" not in cached:
            raise CacheMismatch(f"{self.cache_dir}: sample {self.items[i].id} has no start-image condition latent, "
                                f"which {self.variant.name} trains with. {rebuild_fix('latent_cache')}")
        cond = normalize_latents(cached["condition"], self.vae_config)
        return latent, condition_input(cond, self.variant.temporal_factor, self.last_frame)

    def channels(self) -> int:
        return len(self.vae_config["latents_mean"])

    def buckets(self) -> list[str]:
        return [it.bucket for it in self.items]


def build_dataset(
    workspace: Path,
    *,
    vae_config: dict,
    expect_vae: str | None,
    cached_datasets: set[str],
    folders: Mapping[str, str],
    encode: Encode | None = None,
    variant: Variant = VARIANTS[LEGACY_VARIANT],
    last_frame: bool = False,
) -> TrainData:
    """Join manifests and caches; report samples that cannot train, stop when none can.

    `expect_vae` is the identity of the current VAE (None skips the check); a cache made by
    another VAE is a `CacheMismatch` naming the file and the stage to rerun. Samples of a dataset in `cached_datasets` need a cache file;
    the others are encoded on the fly by `encode`.
    """
    samples_path, captions_path, cache_dir = workspace / SAMPLES, workspace / CAPTION_MANIFEST, workspace / LATENT_CACHE
    for path, stage in ((samples_path, "bucket"), (captions_path, "captions")):
        if not path.is_file():
            raise InputError(f"{path}: missing. Fix: run the {stage} stage first (`dvc repro {stage}`)")
    captions = {r["id"]: r for r in read_jsonl(captions_path)}
    latents = _latent_index(cache_dir, expect_vae, variant, last_frame)
    held_clips = read_split(workspace / SPLIT_FILE).held_out_clips
    held_out: list[str] = []
    items: list[Item] = []
    problems: list[Problem] = []
    for rec in read_jsonl(samples_path):
        if rec["clip_id"] in held_clips:
            held_out.append(rec["id"])
            continue
        if rec["dataset"] not in folders:
            raise InputError(f"{samples_path}: sample {rec['id']} of dataset '{rec['dataset']}', which params.yaml "
                             "does not have. Fix: rerun `dvc repro` after `wanlora sync`")
        dataset_file(workspace, folders[rec["dataset"]], rec["path"], f"{samples_path}: sample {rec['id']}")
        cap = captions.get(rec["clip_id"])
        if cap is None:
            problems.append(Problem(rec["id"], "no caption for its clip (see data/captions/problems.json)",
                                    "add or fix the caption file, then rerun the captions stage", STAGE))
            continue
        cached = rec.get("dataset") in cached_datasets
        if cached and rec["id"] not in latents:
            problems.append(Problem(rec["id"], f"no latent in {cache_dir}",
                                    "rerun the latent_cache stage (`dvc repro latent_cache`)", STAGE))
            continue
        if not cached and encode is None:
            problems.append(Problem(rec["id"], "latents are not cached and no VAE encoder was given",
                                    "set cache_latents: true for its dataset", STAGE))
            continue
        items.append(Item(rec["id"], rec["bucket"], cap["caption"], cap.get("caption_dop"), cached, rec))
    if not items:
        listing = "".join(f"\n  {p.line()}" for p in problems[:10])
        held = f", {len(held_clips)} clip(s) held out for validation" if held_clips else ""
        raise InputError(
            f"{samples_path}: no sample can be trained ({len(problems)} problem(s){held}).{listing}\n"
            "Fix: add clips to the dataset folder (or give a dataset role: train) and rerun `dvc repro`."
        )
    return TrainData(items, problems, vae_config, cache_dir, expect_vae, encode, tuple(held_out), variant, last_frame)


def small_buckets(buckets: list[str], batch_size: int) -> list[Problem]:
    """Buckets with fewer samples than a batch: they train with smaller batches; say so."""
    counts: dict[str, int] = defaultdict(int)
    for b in buckets:
        counts[b] += 1
    return [Problem(f"bucket {b}", f"{n} sample(s), fewer than train.batch_size={batch_size}; "
                    f"its batches hold {n}", "add clips of this size or lower train.batch_size", STAGE)
            for b, n in sorted(counts.items()) if n < batch_size]


def epoch_batches(buckets: list[str], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch (lists of item indices), never mixing buckets; see module doc."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(buckets), generator=g).tolist()
    by_bucket: dict[str, list[int]] = defaultdict(list)
    for i in order:
        by_bucket[buckets[i]].append(i)
    batches = [members[k:k + batch_size] for _, members in sorted(by_bucket.items())
               for k in range(0, len(members), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
