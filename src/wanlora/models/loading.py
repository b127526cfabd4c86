"""Find and load the parts of a Wan 2.2 T2V A14B diffusers folder, safely and one part at a time.

Layout (Wan-AI/Wan2.2-T2V-A14B-Diffusers and ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16):
`model_index.json` (boundary_ratio 0.875), `transformer/` (high-noise expert, t >= 875),
`transformer_2/` (low-noise expert), `vae/`, `text_encoder/` (UMT5-XXL), `tokenizer/`, `scheduler/`.

Safety: a downloaded folder can neither be unpickled nor run its own code.
- `check_layout` validates exactly the files each loader will open: diffusers reads
  `diffusion_pytorch_model.safetensors.index.json` when present, else the single file; transformers
  reads `model.safetensors` first, else its index. A part with a second index, an index naming a
  shard that is not a plain `.safetensors` name, or any pickle file (.bin/.pt/.pth/.ckpt/.pkl) is
  refused before a loader sees it (a decoy index could otherwise pass the check while the loader
  `torch.load`s the shards of the real one).
- A `*config.json` with `auto_map` (which makes transformers offer to import the folder's Python)
  is refused, and every transformers call passes `trust_remote_code=False`.
- torch older than 2.6 is refused where weights load: `torch.load(weights_only=True)`, the
  libraries' last line of defence, can be bypassed up to 2.5.1 (CVE-2025-32434).
Hub downloads fetch only the json/safetensors/tokenizer files of the parts a stage needs.

Memory: `from_pretrained(..., low_cpu_mem_usage=True, device_map=device)` builds the model on the
meta device and fills it shard by shard from memory-mapped safetensors, so host memory never holds
two private copies of an expert; with a CUDA device each tensor goes to the GPU as it is read.
Measured on CPU (4 full-size Wan blocks, 3.10 GiB of bf16 in 10 shards, peak VmHWM of a fresh
process): loading as bf16 added 0.11 GiB (the parameters stay views of the mapped files), loading
as fp32 peaked at 8.4 GiB above the baseline: the 6.1 GiB fp32 copy plus the 3.1 GiB file pages,
which are clean page cache the kernel can drop, not a second private copy.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # imported lazily at run time: a stage that needs the VAE skips transformers
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from wanlora.config import Expert
from wanlora.errors import UserError
from wanlora.io import atomic_write_json, sha256_file, sha256_json
from wanlora.tensorfiles import MODEL_HEADER_BYTES, is_pickle, read_header

ALL_PARTS = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler")
MODEL_PARTS = {"transformer", "transformer_2", "vae", "text_encoder"}
EXPERT_FOLDERS = {"high": "transformer", "low": "transformer_2", "main": "transformer"}  # main: TI2V 5B
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONFIG_FILES = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}
# The file each loader opens with use_safetensors=True (its index adds `.index.json`); diffusers
# prefers the index, transformers the single file (diffusers ModelMixin.from_pretrained /
# _fetch_index_file; transformers modeling_utils._get_resolved_checkpoint_files).
_WEIGHTS_NAME = {"transformer": "diffusion_pytorch_model.safetensors", "transformer_2": "diffusion_pytorch_model.safetensors",
                 "vae": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
                 "captioner": "model.safetensors"}  # a transformers folder, like text_encoder/
_INDEX_FIRST = {"transformer", "transformer_2", "vae"}
_SAFE_TORCH = (2, 6)  # torch.load(weights_only=True) is bypassable up to 2.5.1 (CVE-2025-32434)
#: Full-content hashes of local shards, keyed by (path, size, mtime, inode), in the git-ignored
#: scratch/ of the workspace a stage runs in (its cwd), so a 28 GB expert is hashed once, not every
#: run; outside a workspace nothing is kept.
HASH_CACHE = Path("scratch/model_hashes.json")
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")
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
    """Files to download for `parts`: configs, safetensors and tokenizer files; never pickles.
    The configs `detect_variant` reads come whatever the parts, so a stage that needs only the
    VAE still knows which Wan 2.2 model it serves."""
    patterns = ["model_index.json", "transformer/config.json", "transformer_2/config.json", "vae/config.json"]
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
    return _local_or_hub(
        name_or_path, revision, _hub_patterns(parts), lambda root: check_layout(root, parts),
        f"model.name_or_path {name_or_path!r}: no such folder, and not a hub id (owner/name). "
        "Fix: point model.name_or_path at a diffusers folder of Wan 2.2 T2V A14B "
        "(with model_index.json, transformer/, transformer_2/, vae/, text_encoder/, tokenizer/)",
    )


def _local_or_hub(
    name_or_path: str, revision: str, patterns: Sequence[str], check: Callable[[Path], None], not_a_model: str,
    key: str = "model.name_or_path",
) -> Path:
    """A local folder as is, else a hub id downloaded at `revision` (only `patterns`); `check`ed either
    way. `key` is the params key the fix in a download error names."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        check(local)
        return local
    if not _HUB_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise ModelError(not_a_model)
    try:
        root = _download(name_or_path, revision, patterns, key)
    except ModelError as err:  # "models/wan" may be a mistyped local folder rather than a hub id
        raise ModelError(f"{err} (no local folder {local.resolve()} exists either)") from None
    check(root)
    return root


def _download(repo_id: str, revision: str, patterns: Sequence[str], key: str = "model.name_or_path") -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local_fix = (
        "Fix: download it once where the hub is reachable (`hf download "
        f"{repo_id} --revision {revision}`) and set {key} to that folder, "
        "or keep HF_HUB_OFFLINE=1 with the files already in the hub cache"
    )
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns))
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
def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if is_pickle(p.name))
    if pickles:
        raise ModelError(
            f"{folder}: holds a pickle file ({pickles[0]}); wanlora loads safetensors only, because "
            "unpickling a downloaded file can run arbitrary code. Fix: use the safetensors release of the "
            "model and delete the pickle files from this folder (or convert them yourself in a sandbox you trust)"
        )


def weight_files(folder: Path, part: str) -> list[Path]:
    """Exactly the safetensors files `part`'s loader will open (see `_WEIGHTS_NAME`), each a plain
    name inside `folder`; refuses pickles, a second index, or an index under another name."""
    _refuse_pickles(folder)
    name = _WEIGHTS_NAME[part]
    indexes = sorted(p.name for p in folder.glob("*.index.json"))
    if len(indexes) > 1 or (indexes and indexes[0] != f"{name}.index.json"):
        raise ModelError(
            f"{folder}: shard index(es) {', '.join(indexes)}, but the loader reads only {name}.index.json "
            "(a second index could make the check and the loader see different files). Fix: download "
            f"{part}/ again from a source you trust, keeping only {name}.index.json"
        )
    single, index = folder / name, folder / f"{name}.index.json"
    if not index.is_file() or (single.is_file() and part not in _INDEX_FIRST):
        if not single.is_file():
            raise ModelError(f"{folder}: no {name} (nor {index.name}). Fix: download {part}/ again")
        return [single]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ModelError(f"{index}: unreadable shard index. Fix: download it again") from None
    bad = [s for s in names if not isinstance(s, str) or Path(s).name != s or not s.endswith(".safetensors")]
    if bad:
        raise ModelError(
            f"{index}: shard {str(bad[0])[:200]!r} is not a .safetensors file in {folder}; wanlora reads only "
            "safetensors shards beside their index. Fix: download the model again from a source you trust"
        )
    missing = [s for s in names if not (folder / s).is_file()]
    if missing:
        raise ModelError(
            f"{folder}: {index.name} names {len(missing)} missing shard(s), first {missing[0]}. "
            "Fix: finish the download (all shards listed in the index)"
        )
    return [folder / s for s in names]


def _refuse_remote_code(folder: Path) -> None:
    """transformers imports a folder's own Python for a config with `auto_map` (after asking
    "Do you wish to run the custom code?" on a terminal); Wan 2.2 needs none, so any is refused."""
    for config in sorted(folder.glob("*config.json")):
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{config}: not valid JSON. Fix: download {folder.name}/ again") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise ModelError(
                f"{config}: has auto_map, which asks transformers to run Python code shipped with the model; "
                "wanlora never runs a model folder's code. Fix: use the official release (its configs have no "
                "auto_map), or delete the auto_map entry and any .py files if you trust the weights"
            )


def require_safe_torch(version: str | None = None) -> None:
    """Refuse a torch whose `weights_only` unpickler can be bypassed (before 2.6), with the fix."""
    from packaging.version import Version

    version = str(version or torch.__version__)
    if Version(version).release[:2] < _SAFE_TORCH:
        raise ModelError(
            f"torch {version}: torch.load(weights_only=True) can be bypassed to run code before torch 2.6 "
            "(CVE-2025-32434), and the model libraries fall back to it for non-safetensors files. "
            "Fix: install torch>=2.6 (pip install -U 'torch>=2.6')"
        )


def check_layout(root: str | Path, parts: Sequence[str]) -> None:
    """Raise ModelError unless `root` has every part in `parts` with config and readable
    safetensors weights, no pickles and no remote code. Reads only file headers, never tensors.
    A part model_index.json lists as absent (`[null, null]`: TI2V 5B's transformer_2) is skipped."""
    root = Path(root)
    if not (root / "model_index.json").is_file():
        raise ModelError(
            f"{root}: no model_index.json, so this is not a diffusers pipeline folder. Fix: point "
            "model.name_or_path at the folder that holds model_index.json, transformer/, transformer_2/"
        )
    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{root / 'model_index.json'}: unreadable ({err}). Fix: download it again") from None
    for part in parts:
        if part not in ALL_PARTS:
            raise ValueError(f"unknown part {part!r}; parts are {', '.join(ALL_PARTS)}")
        if isinstance(index, dict) and index.get(part) == [None, None]:
            continue
        folder = root / part
        if not folder.is_dir():
            raise ModelError(
                f"{root}: missing folder {part}/. Fix: use a complete Wan 2.2 T2V A14B diffusers "
                "folder (both experts: transformer/ and transformer_2/), or download the missing part"
            )
        config = folder / _CONFIG_FILES.get(part, "config.json")
        if not config.is_file():
            raise ModelError(f"{folder}: missing {config.name}. Fix: download {part}/ again")
        _refuse_remote_code(folder)
        if part == "tokenizer" and not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model")):
            raise ModelError(f"{folder}: neither tokenizer.json nor spiece.model. Fix: download tokenizer/ again")
        if part in MODEL_PARTS:
            for w in weight_files(folder, part):
                read_header(w, ModelError, MODEL_HEADER_BYTES, "a model shard's",
                            "Fix: download this file again (the folder is incomplete or corrupt)")


# ------------------------------------------------------------------------------- identities
def _hub_blob_sha256(path: Path) -> str | None:
    """The sha256 the hub gave this file, when it is a hub-cache link: huggingface_hub stores a
    large (LFS) file once as `blobs/<sha256 of its content>` and links `snapshots/<commit>/...`
    to it. None for anything else (a copied folder, a small git-stored file)."""
    if not path.is_symlink():
        return None
    blob = path.resolve()
    return blob.name if blob.parent.name == "blobs" and _SHA256_NAME.match(blob.name) else None


def _load_hash_cache() -> dict[str, Any]:
    try:
        data = json.loads(HASH_CACHE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def content_sha256(path: Path) -> str:
    """sha256 of a weight file's whole content: the hub's blob hash where the file came from the
    hub, else computed once and kept in `HASH_CACHE` under (path, size, mtime, inode), so a run
    that finds the file unchanged reads none of it (a 28 GB expert hashes in about a minute)."""
    hub = _hub_blob_sha256(path)
    if hub:
        return hub
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
    entry = _load_hash_cache().get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and _SHA256_NAME.match(str(entry.get("sha256"))):
        return entry["sha256"]
    digest = sha256_file(path)
    if HASH_CACHE.parent.is_dir() or Path("params.yaml").is_file():  # in a workspace (stages run there)
        cache = {k: v for k, v in _load_hash_cache().items() if Path(k).exists()}
        cache[key] = {"stamp": stamp, "sha256": digest}
        atomic_write_json(HASH_CACHE, cache)
    return digest


def model_identity(root: str | Path, part: str) -> str:
    """Short stable identity of one part: its configs and small files by content, each
    safetensors shard by name, size and the sha256 of its whole content (`content_sha256`: the
    hub's blob hash, or a full hash cached by size and mtime), so no byte of the weights can
    change unnoticed. Two folders with the same identity hold the same model; used as cache keys,
    in the training run key and as the 'base model' in lineage. Header-only fields that diffusers
    rewrites on save (version, _name_or_path) are left out, so re-saving a model keeps its identity."""
    folder = Path(root) / part
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(s.startswith(".") for s in rel.split("/")):
            continue
        if path.suffix == ".safetensors":
            entries.append([rel, path.stat().st_size, content_sha256(path)])
        elif rel.endswith("config.json"):
            config = json.loads(path.read_text(encoding="utf-8"))
            entries.append([rel, {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}])
        elif not is_pickle(rel):
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


def load_vae_config(root: str | Path) -> dict[str, Any]:
    """vae/config.json: latents_mean / latents_std for (de)normalising without loading the VAE."""
    path = Path(root) / "vae" / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: missing. Fix: download vae/ of the model")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------- loaders
def load_transformer(
    root: str | Path,
    expert: Expert,
    dtype: str | torch.dtype,
    device: str = "cpu",
    skip: Collection[str] = (),
) -> WanTransformer3DModel:
    """One expert (high -> transformer/, low -> transformer_2/; TI2V 5B's main -> transformer/),
    frozen, in `dtype` on `device`.

    `skip` names modules (qualified, `blocks.3.ffn.net.2`) whose tensors are not read: their
    parameters stay on the meta device for the caller to replace. A quantized-weight cache hit
    passes the ~98% of an expert that it supplies, so it reads ~0.5 GB of norms and embedders
    instead of the whole 28 GB bf16 expert.
    """
    from diffusers import WanTransformer3DModel

    if expert not in EXPERT_FOLDERS:
        raise ValueError(f"expert {expert!r}: use 'high', 'low' or 'main'")
    part = EXPERT_FOLDERS[expert]
    require_safe_torch()
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
    for shard in weight_files(folder, folder.name):
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

    require_safe_torch()
    check_layout(root, ["vae"])
    vae = AutoencoderKLWan.from_pretrained(
        root, subfolder="vae", torch_dtype=to_dtype(dtype), use_safetensors=True,
        low_cpu_mem_usage=True, device_map=str(device),
    )
    return vae.eval().requires_grad_(False)


def load_text_encoder(root: str | Path, dtype: str | torch.dtype, device: str = "cpu") -> UMT5EncoderModel:
    """UMT5 encoder, frozen, streamed from safetensors shards straight to `device`."""
    from transformers import UMT5EncoderModel

    require_safe_torch()
    check_layout(root, ["text_encoder"])
    model = UMT5EncoderModel.from_pretrained(
        Path(root) / "text_encoder", dtype=to_dtype(dtype), use_safetensors=True, device_map=str(device),
        trust_remote_code=False,
    )
    return model.eval().requires_grad_(False)


def load_tokenizer(root: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    check_layout(root, ["tokenizer"])
    return AutoTokenizer.from_pretrained(Path(root) / "tokenizer", trust_remote_code=False)


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


# -------------------------------------------------------------------------------- captioner
#: What a transformers VLM folder needs: configs, safetensors, tokenizer and chat template; never pickles.
CAPTIONER_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model")
CAPTIONER_TYPES = ("qwen2_5_vl", "qwen3_vl")


def resolve_captioner(name_or_path: str, revision: str = "main") -> Path:
    """A local folder or a hub id (downloaded at `revision`, configs and safetensors only) of a
    Qwen-VL-class captioner, checked by `check_captioner`; returns the folder."""
    return _local_or_hub(
        name_or_path, revision, CAPTIONER_PATTERNS, check_captioner,
        f"autocaption.model {name_or_path!r}: no such folder, and not a hub id (owner/name). Fix: point "
        "autocaption.model at a Qwen-VL folder (config.json, *.safetensors, tokenizer files), or set "
        "autocaption.mode: off", key="autocaption.model",
    )


def check_captioner(root: Path) -> None:
    """Raise ModelError unless `root` holds a Qwen-VL config, readable safetensors and a tokenizer."""
    config = root / "config.json"
    if not config.is_file():
        raise ModelError(f"{root}: no config.json, so this is not a transformers model folder. Fix: point "
                         "autocaption.model at the folder that holds config.json")
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if model_type not in CAPTIONER_TYPES:
        raise ModelError(f"{config}: model_type {model_type!r}; the captioner must be one of "
                         f"{', '.join(CAPTIONER_TYPES)}. Fix: use e.g. Qwen/Qwen3-VL-8B-Instruct")
    for w in weight_files(root, "captioner"):  # refuses pickles; names the missing shard
        read_header(w, ModelError, MODEL_HEADER_BYTES, "a model shard's",
                    "Fix: download this file again (the folder is incomplete or corrupt)")
    if not (root / "tokenizer.json").is_file():
        raise ModelError(f"{root}: no tokenizer.json. Fix: download the captioner's tokenizer files again")


def captioner_identity(root: str | Path) -> str:
    """Short stable identity of a captioner folder (configs, tokenizer and shards by content),
    as `model_identity` does for a Wan part: the key of the auto-caption store."""
    root = Path(root)
    entries = []
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix == ".safetensors":
            entries.append([path.name, path.stat().st_size, content_sha256(path)])
        elif path.name.endswith("config.json"):
            config = json.loads(path.read_text(encoding="utf-8"))
            entries.append([path.name, {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}])
        elif not is_pickle(path.name):
            entries.append([path.name, sha256_file(path)])
    return sha256_json(entries)[:16]


def load_captioner(root: str | Path, dtype: str | torch.dtype, device: str = "cpu"):
    """(model, tokenizer, image processor) of a checked captioner folder: safetensors only, no
    remote code, frozen. The image processor is the PIL one, which needs no torchvision; frames go
    in as images (transformers' video processors require torchvision)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    root = Path(root)
    check_captioner(root)
    model = AutoModelForImageTextToText.from_pretrained(
        root, dtype=to_dtype(dtype), use_safetensors=True, trust_remote_code=False, device_map=str(device)
    )
    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    images = Qwen2VLImageProcessorPil.from_pretrained(root)
    return model.eval().requires_grad_(False), tokenizer, images
