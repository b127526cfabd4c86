"""Find and load the parts of a Wan 2.2 T2V A14B diffusers folder, safely and one part at a time.

Layout (Wan-AI/Wan2.2-T2V-A14B-Diffusers and ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16):
`model_index.json` (boundary_ratio 0.875), `transformer/` (high-noise expert, t >= 875),
`transformer_2/` (low-noise expert), `vae/`, `text_encoder/` (UMT5-XXL), `tokenizer/`, `scheduler/`.

Safety: weights are read only from safetensors (`use_safetensors=True` everywhere, and
`check_layout` refuses a part whose weights exist only as a pickle: .bin/.pt/.pth/.ckpt/.pkl),
so a downloaded file can never run code. Hub downloads fetch only the json/safetensors/tokenizer
files of the parts a stage needs.

Memory: `from_pretrained(..., low_cpu_mem_usage=True, device_map=device)` builds the model on the
meta device and fills it shard by shard from memory-mapped safetensors, so host memory never holds
two private copies of an expert; with a CUDA device each tensor goes to the GPU as it is read.
Measured on CPU (4 full-size Wan blocks, 3.10 GiB of bf16 in 10 shards, peak VmHWM of a fresh
process): loading as bf16 added 0.11 GiB (the parameters stay views of the mapped files), loading
as fp32 peaked at 8.4 GiB above the baseline: the 6.1 GiB fp32 copy plus the 3.1 GiB file pages,
which are clean page cache the kernel can drop, not a second private copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # imported lazily at run time: a stage that needs the VAE skips transformers
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from wanlora.errors import UserError
from wanlora.io import sha256_file, sha256_json

ALL_PARTS = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler")
MODEL_PARTS = {"transformer", "transformer_2", "vae", "text_encoder"}
EXPERT_FOLDERS = {"high": "transformer", "low": "transformer_2"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONFIG_FILES = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}
_FINGERPRINT_BYTES = 1 << 20
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash")


class ModelError(UserError, RuntimeError):
    """The base model folder or hub id cannot be used; the message names the file and the fix."""


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' | 'fp16' | 'fp32' (params spelling) or a torch dtype, as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_patterns(parts: Sequence[str]) -> list[str]:
    """Files to download for `parts`: configs, safetensors and tokenizer files; never pickles."""
    patterns = ["model_index.json"]
    for part in parts:
        if part == "tokenizer":
            patterns += [f"{part}/*.json", f"{part}/*.model", f"{part}/*.txt"]
        elif part == "scheduler":
            patterns.append(f"{part}/*.json")
        else:
            patterns += [f"{part}/*.json", f"{part}/*.safetensors"]
    return patterns


def resolve_model(name_or_path: str, revision: str = "main", parts: Sequence[str] = ALL_PARTS) -> Path:
    """A local diffusers folder (used as is) or a hub id (downloaded, pinned to `revision`,
    limited to `parts`), checked with `check_layout`; returns the folder."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        check_layout(local, parts)
        return local
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise ModelError(
            f"model.name_or_path {name_or_path!r}: no such folder, and not a hub id (owner/name). "
            "Fix: point model.name_or_path at a diffusers folder of Wan 2.2 T2V A14B "
            "(with model_index.json, transformer/, transformer_2/, vae/, text_encoder/, tokenizer/)"
        )
    try:
        root = _download(name_or_path, revision, parts)
    except ModelError as err:  # "models/wan" may be a mistyped local folder rather than a hub id
        raise ModelError(f"{err} (no local folder {local.resolve()} exists either)") from None
    check_layout(root, parts)
    return root


def _download(repo_id: str, revision: str, parts: Sequence[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local_fix = (
        "Fix: download it once where the hub is reachable (`hf download "
        f"{repo_id} --revision {revision}`) and set model.name_or_path to that folder, "
        "or keep HF_HUB_OFFLINE=1 with the files already in the hub cache"
    )
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=_hub_patterns(parts))
        )
    except GatedRepoError:
        raise ModelError(
            f"{repo_id}: gated on the hub. Fix: accept its licence on huggingface.co and log in "
            "(`hf auth login`), or point model.name_or_path at a local copy"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"{repo_id}: revision {revision!r} not found. Fix: set model.revision") from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{repo_id}: no such repository on the hub. Fix: check model.name_or_path "
            "(e.g. Wan-AI/Wan2.2-T2V-A14B-Diffusers) or point it at a local folder"
        ) from None
    except LocalEntryNotFoundError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or _hub_offline()
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub is unreachable ({err.__class__.__name__})"
        raise ModelError(f"{repo_id}@{revision}: not in the local hub cache and {why}. {local_fix}") from None
    except OSError as err:  # connection errors surface as OSError subclasses
        raise ModelError(f"{repo_id}@{revision}: download failed ({err}). {local_fix}") from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# ----------------------------------------------------------------------------------- layout
def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file size (catches truncated
    and non-safetensors files) without reading the tensors. Raises ModelError naming the file."""
    size = path.stat().st_size
    fix = "Fix: download this file again (the folder is incomplete or corrupt)"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path}: not a safetensors file (only {size} bytes). {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise ModelError(f"{path}: corrupt safetensors header (claims {n} bytes). {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelError(f"{path}: corrupt safetensors header (not JSON). {fix}") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if ends and max(ends) != size - 8 - n:
        raise ModelError(
            f"{path}: truncated or padded ({size} bytes; its header describes {8 + n + max(ends)}). {fix}"
        )
    return header


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files a part loads, from its index when sharded; checks every shard."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise ModelError(f"{indexes[0]}: unreadable shard index. Fix: download it again") from None
        names = sorted(set(weight_map.values()))
        outside = [s for s in names if Path(s).name != s]
        if outside:
            raise ModelError(
                f"{indexes[0]}: shard name {outside[0]!r} points outside {folder}. Fix: download the "
                "model again from a source you trust"
            )
        missing = [s for s in names if not (folder / s).is_file()]
        if missing:
            raise ModelError(
                f"{folder}: {indexes[0].name} names {len(missing)} missing shard(s), first {missing[0]}. "
                "Fix: finish the download (all shards listed in the index)"
            )
        return [folder / s for s in names]
    return sorted(folder.glob("*.safetensors"))


def check_layout(root: str | Path, parts: Sequence[str]) -> None:
    """Raise ModelError unless `root` has every part in `parts` with config and readable
    safetensors weights. Reads only file headers, never tensors."""
    root = Path(root)
    if not (root / "model_index.json").is_file():
        raise ModelError(
            f"{root}: no model_index.json, so this is not a diffusers pipeline folder. Fix: point "
            "model.name_or_path at the folder that holds model_index.json, transformer/, transformer_2/"
        )
    for part in parts:
        if part not in ALL_PARTS:
            raise ValueError(f"unknown part {part!r}; parts are {', '.join(ALL_PARTS)}")
        folder = root / part
        if not folder.is_dir():
            raise ModelError(
                f"{root}: missing folder {part}/. Fix: use a complete Wan 2.2 T2V A14B diffusers "
                "folder (both experts: transformer/ and transformer_2/), or download the missing part"
            )
        config = folder / _CONFIG_FILES.get(part, "config.json")
        if not config.is_file():
            raise ModelError(f"{folder}: missing {config.name}. Fix: download {part}/ again")
        if part == "tokenizer" and not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
            raise ModelError(f"{folder}: neither tokenizer.json nor spiece.model. Fix: download tokenizer/ again")
        if part in MODEL_PARTS:
            weights = _weight_files(folder)
            if not weights:
                pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
                if pickles:
                    raise ModelError(
                        f"{folder}: weights only as pickle ({pickles[0]}); wanlora loads safetensors "
                        "only, because unpickling a downloaded file can run arbitrary code. Fix: use "
                        "the safetensors release of the model, or convert the file yourself in a "
                        "sandbox you trust"
                    )
                raise ModelError(f"{folder}: no .safetensors weights. Fix: download {part}/ again")
            for w in weights:
                read_safetensors_header(w)


# ------------------------------------------------------------------------------- identities
def _shard_fingerprint(path: Path) -> str:
    """sha256 of a shard's header and its first and last MiB of tensor data: two checkpoints of
    one architecture (the two experts, or a fine-tune) share names, sizes and headers, but not
    these bytes. Reads 2 MiB whatever the shard size."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if size > 2 * _FINGERPRINT_BYTES:
            f.seek(size - _FINGERPRINT_BYTES)
            h.update(f.read())
    return h.hexdigest()


def model_identity(root: str | Path, part: str) -> str:
    """Short stable identity of one part: its configs and small files by content, each
    safetensors shard by name, size and a fingerprint of its first and last MiB (hashing 28 GB
    would take minutes; the header alone cannot tell the two experts apart). Two folders with the
    same identity hold the same model for every practical purpose; used as cache keys and as the
    'base model' in lineage. Header-only fields that diffusers rewrites on save (version,
    _name_or_path) are left out, so re-saving a model keeps its identity."""
    folder = Path(root) / part
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(s.startswith(".") for s in rel.split("/")):
            continue
        if path.suffix == ".safetensors":
            entries.append([rel, path.stat().st_size, _shard_fingerprint(path)])
        elif rel.endswith("config.json"):
            config = json.loads(path.read_text(encoding="utf-8"))
            entries.append([rel, {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}])
        elif not rel.endswith(PICKLE_SUFFIXES):
            entries.append([rel, sha256_file(path)])
    if not entries:
        raise ModelError(f"{folder}: empty or missing. Fix: download {part}/")
    return sha256_json(entries)[:16]


def boundary_ratio(root: str | Path) -> float:
    """The expert switch from model_index.json (0.875 for T2V A14B: high-noise expert at t >= 875)."""
    path = Path(root) / "model_index.json"
    value = json.loads(path.read_text(encoding="utf-8")).get("boundary_ratio")
    if not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ModelError(
            f"{path}: boundary_ratio is {value!r}, so this is not a two-expert Wan 2.2 model. "
            "Fix: use Wan 2.2 T2V A14B, or set multistage.boundary_ratio (0.875 for T2V A14B)"
        )
    return float(value)


def load_scheduler_config(root: str | Path) -> dict[str, Any]:
    path = Path(root) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ModelError(f"{path}: missing. Fix: download scheduler/ of the model")
    return json.loads(path.read_text(encoding="utf-8"))


def load_vae_config(root: str | Path) -> dict[str, Any]:
    """vae/config.json: latents_mean / latents_std for (de)normalising without loading the VAE."""
    path = Path(root) / "vae" / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: missing. Fix: download vae/ of the model")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------- loaders
def load_transformer(
    root: str | Path,
    expert: Literal["high", "low"],
    dtype: str | torch.dtype,
    device: str = "cpu",
    skip: Collection[str] = (),
) -> WanTransformer3DModel:
    """One expert (high -> transformer/, low -> transformer_2/), frozen, in `dtype` on `device`.

    `skip` names modules (qualified, `blocks.3.ffn.net.2`) whose tensors are not read: their
    parameters stay on the meta device for the caller to replace. A quantized-weight cache hit
    passes the ~98% of an expert that it supplies, so it reads ~0.5 GB of norms and embedders
    instead of the whole 28 GB bf16 expert.
    """
    from diffusers import WanTransformer3DModel

    if expert not in EXPERT_FOLDERS:
        raise ValueError(f"expert {expert!r}: use 'high' or 'low'")
    part = EXPERT_FOLDERS[expert]
    check_layout(root, [part])
    if skip:
        return _load_transformer_except(Path(root) / part, to_dtype(dtype), torch.device(device), frozenset(skip))
    model = WanTransformer3DModel.from_pretrained(
        root, subfolder=part, torch_dtype=to_dtype(dtype), use_safetensors=True,
        low_cpu_mem_usage=True, device_map=str(device),
    )
    return model.eval().requires_grad_(False)


def _load_transformer_except(folder: Path, dtype: torch.dtype, device: torch.device, skip: frozenset[str]):
    """`load_transformer` minus the modules in `skip`, with diffusers' dtype rules: floating
    tensors of `_keep_in_fp32_modules` stay fp32, everything else floating becomes `dtype`.

    Built under accelerate's `init_empty_weights` (parameters on meta, the rotary tables that
    no file holds are computed as usual), then filled tensor by tensor from the shards.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    with init_empty_weights():
        model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    keep_fp32 = WanTransformer3DModel._keep_in_fp32_modules or []
    state = {}
    for shard in _weight_files(folder):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.rpartition(".")[0] in skip:
                    continue
                t = f.get_tensor(key)
                if t.is_floating_point():
                    t = t.to(torch.float32 if any(m in key.split(".") for m in keep_fp32) else dtype)
                state[key] = t.to(device)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k.rpartition(".")[0] not in skip]
    if missing or unexpected:
        raise ModelError(
            f"{folder}: weights do not match the config ({len(missing)} missing, e.g. "
            f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]}). "
            "Fix: download the part again"
        )
    for name, buf in model.named_buffers():  # computed tables, still on the host
        module, _, leaf = name.rpartition(".")
        model.get_submodule(module)._buffers[leaf] = buf.to(device)
    return model.eval().requires_grad_(False)


def load_vae(root: str | Path, dtype: str | torch.dtype, device: str = "cpu") -> AutoencoderKLWan:
    """The Wan VAE, frozen. fp32 is the safe choice for encoding (it is small: ~250 MB)."""
    from diffusers import AutoencoderKLWan

    check_layout(root, ["vae"])
    vae = AutoencoderKLWan.from_pretrained(
        root, subfolder="vae", torch_dtype=to_dtype(dtype), use_safetensors=True,
        low_cpu_mem_usage=True, device_map=str(device),
    )
    return vae.eval().requires_grad_(False)


def load_text_encoder(root: str | Path, dtype: str | torch.dtype, device: str = "cpu") -> UMT5EncoderModel:
    """UMT5 encoder, frozen, streamed from safetensors shards straight to `device`."""
    from transformers import UMT5EncoderModel

    check_layout(root, ["text_encoder"])
    model = UMT5EncoderModel.from_pretrained(
        Path(root) / "text_encoder", dtype=to_dtype(dtype), use_safetensors=True, device_map=str(device)
    )
    return model.eval().requires_grad_(False)


def load_tokenizer(root: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    check_layout(root, ["tokenizer"])
    return AutoTokenizer.from_pretrained(Path(root) / "tokenizer")


def clean_prompt(text: str) -> str:
    """The text exactly as WanPipeline gives it to the tokenizer (html unescape, ftfy when
    installed, whitespace collapsed): diffusers' own function, so cache and sampler never drift."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


def make_token_counter(root: str | Path) -> Callable[[str], int]:
    """Token count of a caption as UMT5 sees it (cleaned like WanPipeline, EOS included, not
    truncated), for the captions stage's too-long warnings against the 512-token limit."""
    tokenizer = load_tokenizer(root)

    def count(text: str) -> int:
        return len(tokenizer(clean_prompt(text), add_special_tokens=True)["input_ids"])

    return count
