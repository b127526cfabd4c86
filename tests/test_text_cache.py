"""text_cache: bit-exact agreement with WanPipeline.encode_prompt, incremental reruns, identity checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _helpers import shared_tiny_model, write_captions
from diffusers import WanPipeline

from wanlora.models import text
from wanlora.models.text import (
    CacheError,
    encoder_identity,
    load_text_embeds,
    pad_embeds,
    run_stage,
)

CAPTIONS = {
    "main/a.mp4": ("sks  walking through a park &amp; smiling", "person walking through a park &amp; smiling"),
    "main/b.mp4": ("sks dancing on the beach, slowly", "person dancing on the beach, slowly"),
    "main/c.png": ("sks dancing on the beach, slowly", None),  # same caption twice: encoded once
}
PROMPTS = ["[trigger] holding a red cat", ""]

def _spy(mp: pytest.MonkeyPatch) -> list[str]:
    """Record every text the stage encodes (to check what reruns do)."""
    calls: list[str] = []
    real = text.encode_text

    def spy(tokenizer, model, t, max_length=text.MAX_LENGTH):
        calls.append(t)
        return real(tokenizer, model, t, max_length)

    mp.setattr(text, "encode_text", spy)
    return calls


@pytest.fixture
def counted(monkeypatch):
    return _spy(monkeypatch)


def _run(root, tmp_path, captions=CAPTIONS, prompts=PROMPTS):
    manifest = write_captions(tmp_path / "captions.jsonl", captions)
    out = tmp_path / "cache"
    run_stage(root, manifest, prompts, "sks", out, dtype="fp32", quant="none", device="cpu", dropout=("sks", "person"))
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The cache of CAPTIONS and PROMPTS, encoded once for the module: (texts encoded, folder)."""
    with pytest.MonkeyPatch.context() as mp:
        calls = _spy(mp)
        out = _run(shared_tiny_model(tmp_path_factory), tmp_path_factory.mktemp("text"))
    return calls, out


@pytest.fixture
def cached(first_run, tmp_path):
    """A private copy of the module's cache, in the folder layout `_run(root, tmp_path)` uses."""
    shutil.copytree(first_run[1], tmp_path / "cache")
    return tmp_path / "cache"


def test_cache_equals_pipeline_encode_prompt_bitwise(tmp_path_factory, first_run):
    root = shared_tiny_model(tmp_path_factory)
    counted, out = first_run
    expected = sorted({
        "", "sks  walking through a park &amp; smiling", "person walking through a park &amp; smiling",
        "sks dancing on the beach, slowly", "person dancing on the beach, slowly", "sks holding a red cat",
        "sks", "person",  # what caption dropout trains on: the trigger alone, DOP's class alone
    })
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["texts"]) == expected
    assert sorted(counted) == expected
    assert len(list(out.glob("*.safetensors"))) == 8

    pipe = WanPipeline.from_pretrained(root, torch_dtype=torch.float32)
    for t in expected:
        with torch.no_grad():  # as in WanPipeline.__call__ (grad mode changes the last bits)
            ref, _ = pipe.encode_prompt(t, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
        emb = load_text_embeds(out, t, expect_encoder=encoder_identity(root))
        assert emb.dtype == torch.float32 and emb.shape[1] == 32
        assert torch.equal(pad_embeds([emb]), ref), t
    # the empty caption is the EOS token alone; trimming keeps exactly the real tokens
    assert load_text_embeds(out, "").shape == (1, 32)
    n = len(pipe.tokenizer("sks holding a red cat")["input_ids"])
    assert load_text_embeds(out, "sks holding a red cat").shape == (n, 32)


def test_dropout_texts_are_the_trigger_and_the_class_alone():
    """AI Toolkit's dropped caption is `inject_trigger_into_prompt('', trigger)`, the trigger word
    alone, and its DOP counterpart that text with the trigger replaced by the class, the class
    alone; with no trigger both are '' (toolkit/dataloader_mixins.py, `get_dropout_caption`,
    `get_dop_dropout_caption`; the text cache encodes both, `cache_text_embeddings`). AI Toolkit's
    'sks ' carries a trailing space that Wan's prompt cleaning (diffusers `prompt_clean`) strips
    before UMT5 sees it."""
    from wanlora.data.captions import dropout_texts

    assert dropout_texts("sks", "person") == ("sks", "person")
    assert dropout_texts(" ohwx  man ", "man") == ("ohwx man", "man")
    assert dropout_texts("", "person") == ("", "")
    caps = [{"caption": "sks dog", "caption_dop": "cat dog"}]
    assert text.needed_texts(caps, [], "sks", dropout_texts("sks", "cat")) == sorted({"", "sks", "cat", "sks dog", "cat dog"})
    assert text.needed_texts(caps, [], "", dropout_texts("", "cat")) == sorted({"", "sks dog", "cat dog"})


def test_rerun_encodes_only_new_texts_and_removes_stale(tmp_path_factory, tmp_path, cached, counted):
    root = shared_tiny_model(tmp_path_factory)
    before = {p.name: p.stat().st_mtime_ns for p in cached.glob("*.safetensors")}
    out = _run(root, tmp_path)
    assert counted == []  # nothing encoded again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == before

    changed = {**CAPTIONS, "main/a.mp4": ("sks sitting in a room", "person sitting in a room")}
    _run(root, tmp_path, captions=changed)
    assert counted == ["person sitting in a room", "sks sitting in a room"]
    texts = json.loads((out / "index.json").read_text())["texts"]
    assert "sks  walking through a park &amp; smiling" not in texts
    assert {p.stem for p in out.glob("*.safetensors")} == set(texts.values())


def test_torn_file_is_reencoded(tmp_path_factory, tmp_path, cached, counted):
    key = json.loads((cached / "index.json").read_text())["texts"]["sks holding a red cat"]
    (cached / f"{key}.safetensors").write_bytes(b"\x08\x00")
    out = _run(shared_tiny_model(tmp_path_factory), tmp_path)
    assert counted == ["sks holding a red cat"]
    assert load_text_embeds(out, "sks holding a red cat").shape[1] == 32


def test_other_encoder_is_detected(tmp_path_factory, tmp_path, cached, counted):
    root, other = shared_tiny_model(tmp_path_factory), shared_tiny_model(tmp_path_factory, seed=1)
    assert encoder_identity(root) != encoder_identity(other)
    out = cached
    with pytest.raises(CacheError, match=r"made with text encoder .*dvc repro -f -s text_cache`, then run `dvc repro`"):
        load_text_embeds(out, "", expect_encoder=encoder_identity(other))
    old_files = {p.name for p in out.glob("*.safetensors")}
    _run(other, tmp_path)  # a new encoder re-encodes everything and replaces every file
    assert len(counted) == 8
    assert old_files.isdisjoint(p.name for p in out.glob("*.safetensors"))
    assert len(list(out.glob("*.safetensors"))) == 8
    assert load_text_embeds(out, "", expect_encoder=encoder_identity(other)).shape == (1, 32)


def test_unknown_text_names_the_stage(first_run, tmp_path):
    out = first_run[1]
    with pytest.raises(CacheError, match="no embedding for 'a brand new prompt'.*text_cache"):
        load_text_embeds(out, "a brand new prompt")
    with pytest.raises(CacheError, match="index.json: missing"):
        load_text_embeds(tmp_path / "nowhere", "")


def test_swapped_file_is_refused(cached):
    texts = json.loads((cached / "index.json").read_text())["texts"]
    shutil.copy(cached / f"{texts['']}.safetensors", cached / f"{texts['sks holding a red cat']}.safetensors")
    with pytest.raises(CacheError, match="its text is '', expected 'sks holding a red cat'.*text_cache"):
        load_text_embeds(cached, "sks holding a red cat")


def test_pad_embeds_zero_pads_to_512():
    a, b = torch.ones(3, 4), torch.full((5, 4), 2.0)
    padded = pad_embeds([a, b])
    assert padded.shape == (2, 512, 4)
    assert padded[0, :3].eq(1).all() and padded[0, 3:].eq(0).all()
    assert padded[1, :5].eq(2).all() and padded[1, 5:].eq(0).all()
    with pytest.raises(ValueError, match="600 tokens, more than max_len=512"):
        pad_embeds([torch.zeros(600, 4)])


def test_quantized_encoder_gets_its_own_files(tmp_path_factory, tmp_path, cached, counted):
    """quantization.text_encoder goes through wanlora.models.quant; its embeddings are close to
    the full-precision ones but never mixed with them."""
    root = shared_tiny_model(tmp_path_factory)
    manifest = write_captions(tmp_path / "captions.jsonl", CAPTIONS)
    run_stage(root, manifest, PROMPTS, "sks", cached, dtype="fp32", quant="float8", device="cpu",
              dropout=("sks", "person"))
    assert len(counted) == 8  # every text again: the key covers the quantization
    index = json.loads((cached / "index.json").read_text())
    assert index["quant"] == "float8" and len(list(cached.glob("*.safetensors"))) == 8
    exact = WanPipeline.from_pretrained(root, torch_dtype=torch.float32)
    with torch.no_grad():
        ref, _ = exact.encode_prompt(
            "sks holding a red cat", do_classifier_free_guidance=False, max_sequence_length=512, device="cpu"
        )
    q = pad_embeds([load_text_embeds(cached, "sks holding a red cat")])
    cos = torch.nn.functional.cosine_similarity(q.flatten(), ref.flatten(), dim=0)
    assert not torch.equal(q, ref) and cos > 0.99
