"""safetensors files: the one module that writes them and reads their headers.

- Same tensors and metadata, same bytes. safetensors keeps metadata in a hash map whose order
  changes from process to process, so two runs that produce identical tensors would write
  different files: a resumed run could never match an uninterrupted one, and DVC would see a
  change where there is none. Every header is written with its keys sorted (`to_bytes`, `save`,
  `save_streamed`).
- Never a pickle. A `.bin`/`.pt`/`.ckpt`/... file is refused before it is opened (`refuse_pickle`;
  model folders: `wanlora.models.loading`), because unpickling a downloaded file can run its code.
- A header of unknown origin is read only after its length is checked against the file and a
  cap, its JSON is parsed with nesting caught, and its tensor table must end where the file does
  (`read_header`): a forged or truncated file is an error naming it, not a crash or gigabytes of
  memory. Errors are raised as the caller's class (`error`), so a model folder reports a
  `ModelError` and a LoRA a `LoraFormatError`, each with its own fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wanlora.errors import UserError
from wanlora.io import atomic_open

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: What a LoRA's header can be: ours are under 300 KB for a full A14B LoRA; a forged 100 MB one
#: took 2.7 GB of memory to parse.
LORA_HEADER_BYTES = 4 * 1024 * 1024
#: safetensors' own limit; a model shard's header (tens of thousands of tensors) stays far below.
MODEL_HEADER_BYTES = 100_000_000
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class TensorFileError(UserError, ValueError):
    """A file that is not a readable safetensors file; the message names it."""


# ----------------------------------------------------------------------------------- write
def _header_bytes(header: dict[str, Any]) -> bytes:
    """Sorted keys, compact, space-padded to a multiple of 8 (the data section's alignment)."""
    text = json.dumps(header, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def to_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file as bytes (small files: LoRAs, caches, training state). Tensor offsets are
    relative to the data section, so only the header of safetensors' own output is rewritten."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata) if metadata else None)
    n = int.from_bytes(data[:8], "little")
    header = _header_bytes(json.loads(data[8:8 + n]))
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def save(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write atomically (outputs may be read-only DVC cache links: always a new file, renamed)."""
    with atomic_open(path, "wb") as f:
        f.write(to_bytes(tensors, metadata))


def save_streamed(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Stream tensors into a safetensors file through `wanlora.io.atomic_open`, one tensor's bytes
    in host memory at a time (`to_bytes` would build a whole 7-14 GB quantized expert in RAM)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"{key}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = _header_bytes(header)
    with atomic_open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))


# ------------------------------------------------------------------------------------ read
def is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def refuse_pickle(path: Path, error: type[Exception] = TensorFileError) -> None:
    """Stop before opening anything but a `.safetensors` file; a pickle is named as one."""
    if is_pickle(path.name):
        raise error(
            f"{path}: refused, '{path.suffix}' files are Python pickles that can run code when loaded. "
            "Ask for a .safetensors version, or convert it yourself in a sandbox you trust."
        )
    if path.suffix.lower() != ".safetensors":
        raise error(f"{path}: only .safetensors files are read (got '{path.suffix}')")


def read_header(path: Path, error: type[Exception] = TensorFileError, max_bytes: int = LORA_HEADER_BYTES,
                what: str = "a LoRA's", fix: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor table, metadata) of a safetensors file, reading only its header: 8 bytes of
    length, then JSON. `what` and `max_bytes` say what the file should be; `fix` ends each message."""
    path = Path(path)
    end = f" {fix}" if fix else ""
    refuse_pickle(path, error)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise error(f"{path}: too short to be a safetensors file ({size} bytes).{end}")
        n = int.from_bytes(raw_len, "little")
        if n > size - 8:
            raise error(f"{path}: corrupt safetensors header (claims {n} bytes of a {size}-byte file).{end}")
        if n > max_bytes:
            raise error(f"{path}: header of {n} bytes is larger than {what} can be ({max_bytes >> 20} MiB); refused")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise error(f"{path}: corrupt safetensors header (not JSON).{end}") from None
        except RecursionError:
            raise error(f"{path}: header JSON is nested too deeply; not a safetensors file") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise error(f"{path}: header is not a safetensors table; not a safetensors file")
    metadata = header.pop("__metadata__", None) or {}
    try:
        ends = [int(entry["data_offsets"][1]) for entry in header.values()]
    except (TypeError, KeyError, IndexError, ValueError):
        raise error(f"{path}: header is not a safetensors table; not a safetensors file") from None
    if max(ends, default=0) != size - 8 - n:
        raise error(f"{path}: truncated or padded ({size} bytes; its header describes "
                    f"{8 + n + max(ends, default=0)}).{end}")
    return header, metadata


def load(path: Path, error: type[Exception] = TensorFileError) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file; anything else is refused unopened."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    refuse_pickle(path, error)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as err:
        raise error(f"{path}: not a valid safetensors file ({err})") from None
