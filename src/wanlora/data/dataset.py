"""The training data: one item per bucketed sample, its caption, and its cached tensors.

Joins `data/buckets/samples.jsonl` (what to train on) with `data/captions/captions.jsonl` (the
caption of each clip) and the caches: latents from `data/cache/latents/` (files found by the
`sample_id` in their header, checked against the current VAE), or, for datasets with
`cache_latents: false`, an `encode` callable that decodes the frames and runs the VAE on the fly.
Text embeddings come from `data/cache/text/` through `wanlora.models.text`.

Latents are returned normalised as the Wan pipeline expects them, (z - latents_mean) / latents_std
with the VAE config's per-channel statistics; a 'distribution' cache is sampled (mean + std*eps)
from the trainer's generator each time, so the draw is part of the reproducible stream.

Order: each epoch is a permutation from a generator seeded by (seed, epoch); samples are grouped
by bucket in that order and cut into batches, and the batches are permuted again, so a batch never
mixes buckets and the whole order is a pure function of (seed, epoch): resuming needs only the
epoch and the position in it. A bucket with fewer samples than the batch size still trains (with
a smaller batch) and is reported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wanlora.io import read_jsonl
from wanlora.report import InputError, Problem

STAGE = "train"
Encode = Callable[[dict], tuple[torch.Tensor, torch.Tensor | None]]


class CacheMismatch(InputError):
    """A cache that was made for another model or another bucket; the message names the fix."""


@dataclass(frozen=True)
class Item:
    id: str
    bucket: str
    caption: str
    caption_dop: str | None
    latent_path: Path | None
    record: dict = field(repr=False, compare=False)


def _latent_index(cache_dir: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    """sample_id -> (file, header metadata) for every latent cache file."""
    index = {}
    for path in sorted(cache_dir.glob("*.safetensors")) if cache_dir.is_dir() else []:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "sample_id" in meta:
            index[meta["sample_id"]] = (path, meta)
    return index


@dataclass
class TrainData:
    """Items plus what is needed to turn one into tensors (see module doc)."""

    items: list[Item]
    problems: list[Problem]
    latents_mean: torch.Tensor
    latents_std: torch.Tensor
    encode: Encode | None = None

    def latent(self, i: int, generator: torch.Generator) -> torch.Tensor:
        """Normalised latent [C, F, H, W] of item `i` (float32, CPU)."""
        item = self.items[i]
        if item.latent_path is not None:
            tensors = load_file(str(item.latent_path))
            mean, logvar = (tensors["mean"], tensors["logvar"]) if "mean" in tensors else (tensors["latent"], None)
        else:
            mean, logvar = self.encode(item.record)  # type: ignore[misc]
        z = mean.float()
        if logvar is not None:
            eps = torch.randn(z.shape, generator=generator, dtype=torch.float32)
            z = z + torch.exp(0.5 * logvar.float()) * eps
        shape = (-1,) + (1,) * (z.dim() - 1)
        return (z - self.latents_mean.view(shape)) / self.latents_std.view(shape)

    def buckets(self) -> list[str]:
        return [it.bucket for it in self.items]


def build_dataset(
    workspace: Path,
    *,
    vae_config: dict,
    expect_vae: str | None,
    cached_datasets: set[str],
    encode: Encode | None = None,
) -> TrainData:
    """Join manifests and caches; report samples that cannot train, stop when none can.

    `expect_vae` is the identity of the current VAE (None skips the check); a cache file with
    another identity, or whose bucket differs from the manifest, is a `CacheMismatch` naming the
    file and the stage to rerun. Samples of a dataset in `cached_datasets` need a cache file;
    the others are encoded on the fly by `encode`.
    """
    samples_path = workspace / "data/buckets/samples.jsonl"
    captions_path = workspace / "data/captions/captions.jsonl"
    cache_dir = workspace / "data/cache/latents"
    for path, stage in ((samples_path, "bucket"), (captions_path, "captions")):
        if not path.is_file():
            raise InputError(f"{path}: missing. Fix: run the {stage} stage first (`dvc repro {stage}`)")
    captions = {r["id"]: r for r in read_jsonl(captions_path)}
    latents = _latent_index(cache_dir)
    items: list[Item] = []
    problems: list[Problem] = []
    rerun = "rerun the latent_cache stage (`dvc repro latent_cache`)"
    for rec in read_jsonl(samples_path):
        cap = captions.get(rec["clip_id"])
        if cap is None:
            problems.append(Problem(rec["id"], "no caption for its clip (see data/captions/problems.json)",
                                    "add or fix the caption file, then rerun the captions stage", STAGE))
            continue
        latent_path = None
        if rec.get("dataset") in cached_datasets:
            found = latents.get(rec["id"])
            if found is None:
                problems.append(Problem(rec["id"], f"no latent in {cache_dir}", rerun, STAGE))
                continue
            latent_path, meta = found
            if expect_vae is not None and meta.get("vae") != expect_vae:
                raise CacheMismatch(
                    f"{latent_path}: latent cache made by VAE {meta.get('vae')!r}, but the model's VAE is "
                    f"{expect_vae!r} (model.name_or_path changed?). Fix: {rerun}"
                )
            if meta.get("bucket") not in (None, rec["bucket"]):
                raise CacheMismatch(
                    f"{latent_path}: cached for bucket {meta.get('bucket')}, the manifest says {rec['bucket']}. "
                    f"Fix: {rerun}"
                )
        elif encode is None:
            problems.append(Problem(rec["id"], "latents are not cached and no VAE encoder was given",
                                    "set cache_latents: true for its dataset", STAGE))
            continue
        items.append(Item(rec["id"], rec["bucket"], cap["caption"], cap.get("caption_dop"), latent_path, rec))
    if not items:
        listing = "".join(f"\n  {p.line()}" for p in problems[:10])
        raise InputError(
            f"{samples_path}: no sample can be trained ({len(problems)} problem(s)).{listing}\n"
            "Fix: add clips to the dataset folder and rerun `dvc repro`."
        )
    return TrainData(items, problems, torch.tensor(vae_config["latents_mean"], dtype=torch.float32),
                     torch.tensor(vae_config["latents_std"], dtype=torch.float32), encode)


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
