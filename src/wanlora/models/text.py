"""Stage text_cache: every caption, DOP variant, dropout text, sample prompt and "" encoded by UMT5 once.

The embeddings are bit-for-bit what `WanPipeline.encode_prompt` computes (same cleaning, same
tokenizer call padded to 512, same attention mask, trimmed to the real length), so training on
cached text and sampling through the pipeline condition the transformer identically. One file per
text, named by a key that covers everything the embedding depends on (text, encoder and
tokenizer identity, max length, dtype, quantization, ftfy cleaning): a rerun encodes only new
texts, and a different encoder makes new files instead of silently reusing old ones.

Contract (docs/architecture.md): `<out>/<key>.safetensors` holds `prompt_embeds` [L, D] with
metadata text/encoder/dtype/quant/max_length/tokens; `<out>/index.json` maps text -> key and
records the encoder identity.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.progress import track

from wanlora.errors import rebuild_fix
from wanlora.io import atomic_write_json, read_jsonl, sha256_json
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
from wanlora.models.loading import (
    clean_prompt,
    load_text_encoder,
    load_tokenizer,
    model_identity,
    to_dtype,
)

MAX_LENGTH = 512
TRIGGER_PLACEHOLDER = "[trigger]"
_RERUN = rebuild_fix("text_cache")


def encoder_identity(root: str | Path) -> str:
    """Identity of what turns text into embeddings: the UMT5 weights and the tokenizer."""
    return f"{model_identity(root, 'text_encoder')}+{model_identity(root, 'tokenizer')}"


def _ftfy() -> bool:
    from diffusers.utils import is_ftfy_available

    return bool(is_ftfy_available())


def cache_key(text: str, encoder: str, dtype: str, quant: str, max_length: int = MAX_LENGTH) -> str:
    """File stem of a text's embedding: changes whenever the embedding could change."""
    return sha256_json(
        {"text": text, "encoder": encoder, "max_length": max_length, "dtype": dtype, "quant": quant, "ftfy": _ftfy()}
    )


def needed_texts(captions: list[dict], prompts: list[str], trigger: str, dropout: tuple[str, str]) -> list[str]:
    """Every distinct text the trainer and sampler will ask for, sorted: captions, their DOP
    variants, `dropout` (what caption dropout puts in their place: the trigger alone and the class
    alone, `wanlora.data.captions.dropout_texts`), the empty caption (unconditional branch) and the
    sample prompts with [trigger] filled in. The dropout pair is cached whatever
    `train.caption_dropout` says: two texts, and changing the rate reruns no encoder."""
    texts = {"", *dropout}
    for rec in captions:
        texts.add(rec["caption"])
        if rec.get("caption_dop") is not None:
            texts.add(rec["caption_dop"])
    texts.update(p.replace(TRIGGER_PLACEHOLDER, trigger) for p in prompts)
    return sorted(texts)


@torch.no_grad()
def encode_text(tokenizer, text_encoder, text: str, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """[L, D] embedding of one text, trimmed to its real token count, exactly as WanPipeline's
    `_get_t5_prompt_embeds` computes it before padding (one text per call: batching changes
    the bits of the result through BLAS blocking)."""
    inputs = tokenizer(
        [clean_prompt(text)],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state
    length = int(mask.gt(0).sum())
    return hidden[0, :length].cpu().contiguous()


def run_stage(
    root: Path,
    captions_manifest: Path,
    prompts: list[str],
    trigger: str,
    out_dir: Path,
    dtype: str,
    quant: str,
    device: str,
    store: Path | None = None,
    *,
    dropout: tuple[str, str],
) -> None:
    """Encode the texts that have no valid cache file, remove files no longer needed, write index.json."""
    out_dir = Path(out_dir)
    texts = needed_texts(read_jsonl(captions_manifest), prompts, trigger, dropout)
    encoder = encoder_identity(root)
    keys = {t: cache_key(t, encoder, dtype, quant) for t in texts}
    todo = [t for t in texts if not restore(out_dir, store, keys[t], encoder=encoder)]

    if todo:
        tokenizer = load_tokenizer(root)
        model = load_text_encoder(root, to_dtype(dtype), device)
        if quant != "none":
            from wanlora.models.quant import quantize_module

            quantize_module(model, quant, device=device)
        try:
            for text in track(todo, description=f"text_cache: encoding {len(todo)} text(s)"):
                embeds = encode_text(tokenizer, model, text)
                meta = {
                    "text": text, "encoder": encoder, "dtype": dtype, "quant": quant,
                    "max_length": str(MAX_LENGTH), "tokens": str(embeds.shape[0]),
                }
                save_item(out_dir, store, keys[text], {"prompt_embeds": embeds}, meta)
        finally:
            del model
            free(device)

    remove_stale(out_dir, set(keys.values()))
    atomic_write_json(
        out_dir / INDEX,
        {"encoder": encoder, "dtype": dtype, "quant": quant, "max_length": MAX_LENGTH, "texts": keys},
    )


def load_text_embeds(cache_dir: str | Path, text: str, expect_encoder: str | None = None) -> torch.Tensor:
    """The cached [L, D] embedding of `text`. With `expect_encoder` (see `encoder_identity`), a
    cache made by another text encoder is an error rather than a silent mismatch."""
    cache_dir = Path(cache_dir)
    index = read_index(cache_dir, _RERUN)
    if expect_encoder is not None and index.get("encoder") != expect_encoder:
        raise CacheError(
            f"{cache_dir}: made with text encoder {index.get('encoder')}, but the model now is "
            f"{expect_encoder}. {_RERUN}"
        )
    key = index["texts"].get(text)
    if key is None:
        raise CacheError(f"{cache_dir}: no embedding for {text!r} (a caption or prompt changed?). {_RERUN}")
    return read_item(item_path(cache_dir, key), _RERUN, text=text, encoder=index["encoder"])["prompt_embeds"]


def pad_embeds(embeds: list[torch.Tensor], max_len: int = MAX_LENGTH) -> torch.Tensor:
    """Stack [L_i, D] embeddings into [B, max_len, D] with zero padding, as WanPipeline does
    after trimming (the transformer sees zeros, not the encoder's padding outputs)."""
    if not embeds:
        raise ValueError("pad_embeds needs at least one embedding")
    longest = max(e.shape[0] for e in embeds)
    if longest > max_len:
        raise ValueError(f"an embedding has {longest} tokens, more than max_len={max_len}")
    out = embeds[0].new_zeros(len(embeds), max_len, embeds[0].shape[1])
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
    return out
