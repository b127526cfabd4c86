"""A full-size random-weight Wan 2.2 T2V A14B in the real diffusers layout, for `dvc repro` on a GPU.

The bench harnesses build experts in memory (`wanlora.models.geometry.build_transformer`); the
pipeline's stages load a folder from disk. To run `dvc repro` at full size without the 70 GB
download (the device machine reaches no hub), this writes that folder: both 14B experts
(`transformer/`, `transformer_2/`, the hub's config), the full UMT5-XXL encoder, the Wan VAE in
its default (= published) config, the UniPC scheduler and model_index.json with boundary_ratio
0.875. Weights are the modules' own random initialisation, built on the GPU when there is one
(a 14B expert inits in seconds there, minutes on a CPU), in the dtypes the hub stores (bf16
experts with diffusers' fp32 exceptions, a bf16 encoder, an fp32 VAE), written in safetensors
shards with the index file each loader looks for.

One difference from the published model: the tokenizer is the tiny model's (whole words for a
small vocabulary, single characters otherwise; `wanlora.models.tiny.tiny_tokenizer`), since the
real sentencepiece model cannot be fetched there. Its ids fall inside UMT5's vocabulary, so every
shape the encoder and transformer see is the real one; only the token counts of captions differ.

    python -m bench.full_model /root/wan                      # the full model, ~69 GB
    python -m bench.full_model /root/wan --place transformer_2=/dev/shm/wan text_encoder=/dev/shm/wan
    python -m bench.full_model /tmp/wan --tiny                # the same code at tiny size (tests)

`--place PART=DIR` writes PART's folder under DIR and links it into the model folder, so the ~69 GB
can be split over a disk and a tmpfs. `--parts` writes some parts only (several processes can
write one model in parallel: the shared small files are written by every one of them, identically).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanlora.models.geometry import TINY, WAN22_A14B, build_transformer
from wanlora.models.tiny import SCHEDULER, tiny_tokenizer
from wanlora.models.variant import get_variant

#: text_encoder/config.json of Wan-AI/Wan2.2-T2V-A14B-Diffusers (UMT5-XXL, encoder only).
UMT5_XXL = {
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
    "tie_word_embeddings": False, "layer_norm_epsilon": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
}
#: The tiny UMT5 of `wanlora.models.tiny` (same fields; text_dim of the tiny transformer).
UMT5_TINY = {**UMT5_XXL, "vocab_size": 256384, "d_model": TINY["text_dim"], "d_kv": 8, "d_ff": 64, "num_layers": 2,
             "num_heads": 4, "relative_attention_num_buckets": 8}
#: The tiny VAE of `wanlora.models.tiny` (the full one is AutoencoderKLWan's defaults).
VAE_TINY = {"base_dim": 8, "z_dim": TINY["in_channels"], "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True]}
PARTS = ("transformer", "transformer_2", "text_encoder", "vae")
#: (library, class) per part, as WanPipeline.save_pretrained writes them into model_index.json.
INDEX = {
    "_class_name": "WanPipeline", "boundary_ratio": get_variant("t2v-a14b").boundary, "expand_timesteps": False,
    "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "WanTransformer3DModel"],
    "transformer_2": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
}
#: Weight file stem and index name per library (what from_pretrained opens with use_safetensors).
STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}


def build(part: str, tiny: bool, device: str, seed: int) -> torch.nn.Module:
    """One part with its own random init, created on `device` in the dtype the hub stores it in."""
    if part in ("transformer", "transformer_2"):
        return build_transformer(TINY if tiny else WAN22_A14B, torch.bfloat16, device, seed + (part == "transformer_2"))
    torch.manual_seed(seed + PARTS.index(part))
    if part == "text_encoder":
        from transformers import UMT5Config, UMT5EncoderModel

        with torch.device(device):
            model = UMT5EncoderModel(UMT5Config(**(UMT5_TINY if tiny else UMT5_XXL)))
        return model.to(torch.bfloat16)
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        return AutoencoderKLWan(**(VAE_TINY if tiny else {}))


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (UMT5's embed_tokens is `shared`), as save_pretrained writes it."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t
    return out


def shards(state: dict[str, torch.Tensor], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most `max_bytes` each (one tensor may exceed it alone)."""
    group, size = {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if group and size + n > max_bytes:
            yield group
            group, size = {}, 0
        group[name], size = t, size + n
    if group:
        yield group


def write_weights(model: torch.nn.Module, folder: Path, library: str, max_shard_bytes: int) -> int:
    """Safetensors shards + index (or one file when a single shard holds it); returns bytes written."""
    stem = STEMS[library]
    groups = list(shards(unique_state(model), max_shard_bytes))
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        name = f"{stem}.safetensors" if len(groups) == 1 else f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in group.items()}
        save_file(cpu, str(folder / name), metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in cpu.values())
        weight_map.update(dict.fromkeys(cpu, name))
        del cpu
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total


def write_part(root: Path, part: str, tiny: bool, device: str, seed: int, place: Path | None,
               max_shard_bytes: int) -> int:
    folder = root / part
    if place is not None:
        target = place / part
        target.mkdir(parents=True, exist_ok=True)
        if folder.is_symlink() or folder.exists():
            if folder.resolve() != target.resolve():
                raise FileExistsError(f"{folder} exists and is not a link to {target}")
        else:
            folder.symlink_to(target, target_is_directory=True)
    folder.mkdir(parents=True, exist_ok=True)
    model = build(part, tiny, device, seed)
    if part == "text_encoder":
        model.config.save_pretrained(folder)  # transformers config.json
    else:
        model.save_config(folder)  # diffusers config.json
    n = write_weights(model, folder, INDEX[part][0], max_shard_bytes)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return n


def write_small_files(root: Path) -> None:
    """model_index.json, scheduler/ and tokenizer/: a few KB, the same for every size."""
    from diffusers import UniPCMultistepScheduler

    root.mkdir(parents=True, exist_ok=True)
    UniPCMultistepScheduler(**SCHEDULER).save_pretrained(root / "scheduler")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps(INDEX, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tiny", action="store_true", help="tiny geometry (a CPU test of this writer)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--place", nargs="*", default=[], metavar="PART=DIR", help="write PART under DIR and link it")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gib", type=float, default=4.0)
    ap.add_argument("--skip-small", action="store_true", help="leave model_index.json, scheduler/, tokenizer/ "
                    "to another writer of the same model running in parallel")
    args = ap.parse_args(argv)
    place = {}
    for item in args.place:
        part, _, where = item.partition("=")
        if part not in PARTS or not where:
            ap.error(f"--place {item!r}: use PART=DIR with PART one of {', '.join(PARTS)}")
        place[part] = Path(where)
    if not args.skip_small:
        write_small_files(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        t0 = time.perf_counter()
        n = write_part(args.out, part, args.tiny, args.device, args.seed, place.get(part), int(args.shard_gib * 2**30))
        dt = time.perf_counter() - t0
        print(f"WROTE {part}: {n / 2**30:.2f} GiB in {dt:.1f} s ({n / 2**30 / dt:.2f} GiB/s) -> "
              f"{os.path.realpath(args.out / part)}", flush=True)


if __name__ == "__main__":
    main()
