"""What the text and latent caches share: one safetensors file per item, named by a content key,
an index.json, validation by header metadata, stale-file removal, and freeing the encoder.

Both caches are folders DVC tracks as outs, so every write is atomic (wanlora.io) and a rerun
leaves exactly the files the current request needs.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from wanlora.errors import UserError
from wanlora.io import atomic_write_bytes
from wanlora.tensorfiles import to_bytes

INDEX = "index.json"


class CacheError(UserError, RuntimeError):
    """A cache that does not match the request; the message says which stage to rerun."""


def item_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.safetensors"


def is_valid(path: Path, **expected: str) -> bool:
    """True when `path` is a readable safetensors file whose metadata has the expected values;
    a torn, foreign or outdated file is simply encoded again."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return False
    return all(meta.get(k) == v for k, v in expected.items())


def write_item(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write_bytes(path, to_bytes(tensors, metadata))


def restore(cache_dir: Path, store: Path | None, key: str, **expected: str) -> bool:
    """True when the item is in `cache_dir`, linking it in from `store` first if only that has it.

    Why a store: DVC deletes a stage's outs before rerunning it, so adding one clip would
    re-encode every latent. Items are also kept in a git-ignored store (scratch/cache/...) keyed by
    content, and a rerun links them back instead of running the VAE or UMT5 again.
    """
    target = item_path(cache_dir, key)
    if is_valid(target, **expected):
        return True
    if store is None or not is_valid(item_path(store, key), **expected):
        return False
    publish(store, cache_dir, key)
    return True


def publish(store: Path, cache_dir: Path, key: str) -> None:
    """Hard-link (or copy, across file systems) a stored item into the cache folder, atomically."""
    source, target = item_path(store, key), item_path(cache_dir, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def save_item(cache_dir: Path, store: Path | None, key: str, tensors: dict[str, torch.Tensor],
              metadata: dict[str, str]) -> None:
    """Write a new item into the store (when there is one) and publish it into the cache folder."""
    if store is None:
        write_item(item_path(cache_dir, key), tensors, metadata)
        return
    write_item(item_path(store, key), tensors, metadata)
    publish(store, cache_dir, key)


def remove_stale(cache_dir: Path, keys: set[str]) -> None:
    """Delete item files whose key is no longer needed (DVC would otherwise version them)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for path in cache_dir.glob("*.safetensors"):
        if path.stem not in keys:
            path.unlink()


def read_index(cache_dir: Path, fix: str) -> dict[str, Any]:
    """index.json, parsed once per version of the file (the trainer asks for it every step)."""
    path = Path(cache_dir) / INDEX
    try:
        stamp = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise CacheError(f"{path}: missing. {fix}") from None
    return _parse(str(path), stamp)


@functools.lru_cache(maxsize=8)
def _parse(path: str, stamp: int) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_item(path: Path, fix: str, **expected: str) -> dict[str, torch.Tensor]:
    """All tensors of an item file whose metadata has the expected values, else CacheError."""
    if not path.is_file():
        raise CacheError(f"{path}: missing. {fix}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k, v in expected.items():
            if meta.get(k) != v:
                raise CacheError(f"{path}: its {k} is {meta.get(k)!r}, expected {v!r}. {fix}")
        return {k: f.get_tensor(k) for k in f.keys()}


def free(device: str) -> None:
    """Release an encoder's memory after `del`: the next stage or step needs the card."""
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
