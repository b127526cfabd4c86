"""Training state on disk: safetensors for tensors, JSON for everything else, never pickle.

Layout of `scratch/train/<key>/` (key = hash of the resolved params and the input manifests):
  latest.json                  {"step": N, "dir": "state_NNNNNN"}: the one valid state
  state_NNNNNN/tensors.safetensors, state_NNNNNN/state.json
  lora/{high,low}/step_NNNNNN.safetensors   the last `save.keep_last` LoRA pairs

A state is written into a hidden temporary folder, renamed into place as a whole, and only then
named by latest.json (itself replaced atomically); older states are deleted afterwards. A kill
or a full disk at any point leaves the previous state intact and no partial folder behind.
The LoRA history lives here too and is mirrored to `data/lora/`, because DVC deletes a stage's
outputs before rerunning it: a resumed run republishes the files an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load

from wanlora.config import EXPERTS
from wanlora.io import atomic_write_bytes, atomic_write_json
from wanlora.tensorfiles import to_bytes as safetensors_bytes

LATEST = "latest.json"


def step_name(step: int) -> str:
    return f"step_{step:06d}.safetensors"


# ----------------------------------------------------------------------------- optimizer
def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON form of a nested state value; tensors go to `tensors` under `path` and leave a
    reference. Dict key types and tuples are kept (bitsandbytes nests its quantization state in
    dicts; torch keys per-parameter state by int)."""
    if torch.is_tensor(value):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__dict__": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    return value


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {k: _decode(v, tensors) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Split an optimizer's state_dict into tensors (for safetensors) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _encode(opt.state_dict(), prefix, tensors)


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: Any) -> None:
    opt.load_state_dict(_decode(plain, tensors))


# --------------------------------------------------------------------------------- state
def save_state(folder: Path, step: int, tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """Write one complete state atomically (see module doc), then drop older ones.

    Starts by removing hidden leftovers of saves a kill interrupted (`.state_N.*` folders, `.tmp`
    files): nothing reads them, and over days of restarts they would fill the disk."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".state_*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    name = f"state_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    try:
        atomic_write_bytes(tmp / "tensors.safetensors",
                           safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
        atomic_write_json(tmp / "state.json", {"step": step, **plain})
        final = folder / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_json(folder / LATEST, {"step": step, "dir": name})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in folder.glob("state_*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The state latest.json names, or None when there is none yet."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text(encoding="utf-8"))["dir"]
    tensors = safetensors_load((folder / name / "tensors.safetensors").read_bytes())
    plain = json.loads((folder / name / "state.json").read_text(encoding="utf-8"))
    return tensors, plain


# ---------------------------------------------------------------------------- LoRA files
def save_lora_pair(folder: Path, step: int, files: dict[str, bytes]) -> None:
    """Write `files` ({expert: bytes}) as lora/<expert>/step_N.safetensors, all or none."""
    try:
        for expert, data in files.items():
            atomic_write_bytes(folder / "lora" / expert / step_name(step), data)
    except BaseException:
        discard_loras(folder, step)
        raise


def discard_loras(folder: Path, step: int) -> None:
    """Remove the LoRA files of `step` (a checkpoint whose state could not be written)."""
    for path in (folder / "lora").glob(f"*/{step_name(step)}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def prune_loras(folder: Path, keep_last: int) -> None:
    """Keep only the newest `keep_last` steps of each expert."""
    for expert_dir in sorted((folder / "lora").glob("*")):
        for old in sorted(expert_dir.glob("step_*.safetensors"))[:-keep_last]:
            old.unlink()


def publish_loras(folder: Path, out: Path) -> list[Path]:
    """Make `out/{high,low,main}/` hold exactly the files of `folder/lora/` (LoRAs and their lineage
    sidecars), as byte copies written atomically; files already identical are left alone."""
    published = []
    for expert in EXPERTS:
        src, dst = folder / "lora" / expert, out / expert
        wanted = {p.name: p for p in sorted(src.iterdir()) if not p.name.startswith(".")} if src.is_dir() else {}
        for stale in sorted(dst.iterdir()) if dst.is_dir() else []:
            if stale.name not in wanted:
                stale.unlink()
        for name, path in wanted.items():
            target = dst / name
            data = path.read_bytes()
            if not target.is_file() or target.read_bytes() != data:
                atomic_write_bytes(target, data)
            published.append(target)
    return published
