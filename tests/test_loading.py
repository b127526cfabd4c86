"""Loading: layouts, bad folders (missing expert, corrupt shard, pickles), hub ids offline, identities."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from _model_helpers import copy_model, tiny_model
from safetensors.torch import load_file, save_file

from wanlora.models.loading import (
    ModelError,
    boundary_ratio,
    check_layout,
    load_scheduler_config,
    load_text_encoder,
    load_transformer,
    make_token_counter,
    model_identity,
    resolve_model,
)

ALL = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler")


@pytest.fixture
def model(tmp_path_factory, tmp_path):
    """A private copy of the tiny model that a test may damage."""
    return copy_model(tiny_model(tmp_path_factory), tmp_path / "model")


def test_local_folder_resolves_and_loads_each_expert(tmp_path_factory):
    root = tiny_model(tmp_path_factory)
    assert resolve_model(str(root)) == root
    assert boundary_ratio(root) == 0.875
    assert load_scheduler_config(root)["flow_shift"] == 3.0
    high, low = load_transformer(root, "high", "bf16"), load_transformer(root, "low", "fp32")
    want_high = load_file(root / "transformer/diffusion_pytorch_model.safetensors")
    want_low = load_file(root / "transformer_2/diffusion_pytorch_model.safetensors")
    w = "blocks.0.attn1.to_q.weight"
    assert high.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert torch.equal(high.state_dict()[w], want_high[w].to(torch.bfloat16))
    assert torch.equal(low.state_dict()[w], want_low[w])
    assert not torch.equal(want_high[w], want_low[w])
    assert not any(p.requires_grad for p in high.parameters())
    with pytest.raises(ValueError, match="expert 'mid': use 'high' or 'low'"):
        load_transformer(root, "mid", "bf16")


def test_token_counter_counts_eos_like_umt5(tmp_path_factory):
    count = make_token_counter(tiny_model(tmp_path_factory))
    assert count("") == 1
    assert count("sks walking") == 3  # two whole-word pieces + </s>
    assert count("  sks   walking \n") == 3  # cleaned like WanPipeline
    assert count("sks " * 600) == 601  # not truncated: the captions stage reports it


def test_missing_expert_folder(model):
    shutil.rmtree(model / "transformer_2")
    with pytest.raises(ModelError, match=r"model: missing folder transformer_2/\. Fix: .*both experts"):
        resolve_model(str(model))
    assert resolve_model(str(model), parts=("vae", "text_encoder")) == model  # a stage that needs no expert


def test_missing_config_and_index(model, tmp_path):
    (model / "vae/config.json").unlink()
    with pytest.raises(ModelError, match=r"vae: missing config.json"):
        check_layout(model, ["vae"])
    with pytest.raises(ModelError, match="no model_index.json"):
        check_layout(model / "transformer", ["transformer"])


def test_truncated_and_garbage_shards(model):
    shard = model / "transformer/diffusion_pytorch_model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model.safetensors: truncated or padded .*download this file again"):
        check_layout(model, ["transformer"])
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="corrupt safetensors header"):
        load_transformer(model, "high", "fp32")


def test_index_naming_a_missing_shard(model):
    folder = model / "transformer_2"
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:10]}, folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
    weight_map = {k: f"diffusion_pytorch_model-0000{1 if i < 10 else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map})
    )
    with pytest.raises(ModelError, match=r"names 1 missing shard\(s\), first diffusion_pytorch_model-00002-of-00002"):
        check_layout(model, ["transformer_2"])
    save_file({k: tensors[k] for k in names[10:]}, folder / "diffusion_pytorch_model-00002-of-00002.safetensors")
    low = load_transformer(model, "low", "fp32")  # complete shards load, and equal the original
    assert all(torch.equal(low.state_dict()[k], tensors[k]) for k in names)


class _Trap:
    """Unpickling this creates a folder: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_weights_are_refused_unread(model, tmp_path):
    marker = tmp_path / "UNPICKLED"
    (model / "text_encoder/model.safetensors").unlink()
    (model / "text_encoder/pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    (model / "transformer/diffusion_pytorch_model.safetensors").unlink()
    (model / "transformer/diffusion_pytorch_model.pt").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(ModelError, match=r"text_encoder: weights only as pickle \(pytorch_model.bin\); wanlora loads safetensors only"):
        load_text_encoder(model, "fp32")
    with pytest.raises(ModelError, match=r"transformer: weights only as pickle \(diffusion_pytorch_model.pt\)"):
        load_transformer(model, "high", "fp32")
    assert not marker.exists()


def test_hub_id_offline_says_how_to_use_a_local_folder(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as err:
        resolve_model("Wan-AI/Wan2.2-T2V-A14B-Diffusers", revision="main", parts=("vae",))
    msg = str(err.value)
    assert "Wan-AI/Wan2.2-T2V-A14B-Diffusers@main: not in the local hub cache and HF_HUB_OFFLINE is set" in msg
    assert "set model.name_or_path to that folder" in msg
    assert "no local folder" in msg and "Wan-AI/Wan2.2-T2V-A14B-Diffusers exists either" in msg


def test_hub_id_offline_uses_the_hub_cache(tmp_path_factory, monkeypatch, tmp_path):
    """A hub id whose snapshot is already in the hub cache resolves offline, pinned to the
    revision's commit (the layout huggingface_hub writes: refs/<rev> -> snapshots/<commit>/)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--wanlora--tiny-wan"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model(tmp_path_factory), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    root = resolve_model("wanlora/tiny-wan", revision="main", parts=("vae", "tokenizer"))
    assert root == repo / "snapshots" / commit
    assert model_identity(root, "vae") == model_identity(tiny_model(tmp_path_factory), "vae")
    with pytest.raises(ModelError, match="wanlora/tiny-wan@v2: not in the local hub cache"):
        resolve_model("wanlora/tiny-wan", revision="v2", parts=("vae",))


def test_path_that_is_neither_folder_nor_hub_id(tmp_path):
    with pytest.raises(ModelError, match="no such folder, and not a hub id.*point model.name_or_path at a diffusers folder"):
        resolve_model(str(tmp_path / "nowhere"))


def test_identity_is_cheap_stable_and_discriminating(model, tmp_path):
    ids = {part: model_identity(model, part) for part in ALL}
    assert len(set(ids.values())) == len(ALL)  # the two experts differ although shaped alike
    assert all(len(i) == 16 for i in ids.values())
    copy = copy_model(model, tmp_path / "copy")
    assert {part: model_identity(copy, part) for part in ALL} == ids  # location does not matter
    cfg_path = copy / "vae/config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_diffusers_version": "9.9.9"}))
    assert model_identity(copy, "vae") == ids["vae"]  # re-saving with another diffusers: same model
    cfg_path.write_text(json.dumps({**cfg, "latents_std": [1.0] * 16}))
    assert model_identity(copy, "vae") != ids["vae"]
    shard = copy / "transformer/diffusion_pytorch_model.safetensors"
    tensors = load_file(shard)
    tensors["proj_out.bias"] = tensors["proj_out.bias"] + 1  # same names, shapes and size
    save_file(tensors, shard, metadata={"format": "pt"})
    assert model_identity(copy, "transformer") != ids["transformer"]


def test_boundary_ratio_missing_is_an_error(model):
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    with pytest.raises(ModelError, match="boundary_ratio is None.*multistage.boundary_ratio"):
        boundary_ratio(model)


def test_skipped_modules_are_never_read_and_the_rest_loads_as_diffusers_does(tmp_path_factory):
    """A quantized-cache hit loads an expert minus its linears: every other tensor, buffers
    included, must equal `from_pretrained`'s in value and dtype (fp32 modules stay fp32)."""
    root = tiny_model(tmp_path_factory)
    full = load_transformer(root, "low", "bf16")
    skip = {n for n, m in full.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)}
    part = load_transformer(root, "low", "bf16", skip=skip)
    got = dict(part.named_parameters()) | dict(part.named_buffers())
    want = dict(full.named_parameters()) | dict(full.named_buffers())
    assert got.keys() == want.keys()
    for key, t in want.items():
        if key.rpartition(".")[0] in skip:
            assert got[key].is_meta, key
        else:
            assert got[key].dtype == t.dtype and torch.equal(got[key], t), key
    assert part.blocks[0].norm2.weight.dtype == torch.float32  # diffusers' _keep_in_fp32_modules
    assert not any(p.requires_grad for p in part.parameters() if not p.is_meta)
