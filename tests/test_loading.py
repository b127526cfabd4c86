"""Loading: layouts, bad folders (missing expert, corrupt shard, pickles), hub ids offline, identities."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from _helpers import copy_model, shared_tiny_model
from safetensors.torch import load_file, save_file

from wanlora.models.loading import (
    ModelError,
    boundary_ratio,
    check_layout,
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
    return copy_model(shared_tiny_model(tmp_path_factory), tmp_path / "model")


def test_local_folder_resolves_and_loads_each_expert(tmp_path_factory):
    root = shared_tiny_model(tmp_path_factory)
    assert resolve_model(str(root)) == root
    assert boundary_ratio(root) == 0.875
    high, low = load_transformer(root, "high", "bf16"), load_transformer(root, "low", "fp32")
    want_high = load_file(root / "transformer/diffusion_pytorch_model.safetensors")
    want_low = load_file(root / "transformer_2/diffusion_pytorch_model.safetensors")
    w = "blocks.0.attn1.to_q.weight"
    assert high.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert torch.equal(high.state_dict()[w], want_high[w].to(torch.bfloat16))
    assert torch.equal(low.state_dict()[w], want_low[w])
    assert not torch.equal(want_high[w], want_low[w])
    assert not any(p.requires_grad for p in high.parameters())
    with pytest.raises(ValueError, match="expert 'mid': use 'high', 'low' or 'main'"):
        load_transformer(root, "mid", "bf16")


def test_token_counter_counts_eos_like_umt5(tmp_path_factory):
    count = make_token_counter(shared_tiny_model(tmp_path_factory))
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
    with pytest.raises(ModelError, match=r"text_encoder: holds a pickle file \(pytorch_model.bin\); wanlora loads safetensors only"):
        load_text_encoder(model, "fp32")
    with pytest.raises(ModelError, match=r"transformer: holds a pickle file \(diffusion_pytorch_model.pt\)"):
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
    shutil.copytree(shared_tiny_model(tmp_path_factory), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    root = resolve_model("wanlora/tiny-wan", revision="main", parts=("vae", "tokenizer"))
    assert root == repo / "snapshots" / commit
    assert model_identity(root, "vae") == model_identity(shared_tiny_model(tmp_path_factory), "vae")
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
    root = shared_tiny_model(tmp_path_factory)
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


# ------------------------------------------------------------ untrusted folders (issue 22)
def _shard_in_two(folder, index_name="diffusion_pytorch_model.safetensors.index.json"):
    """Re-save a part as two safetensors shards plus the index diffusers reads; returns the tensors."""
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(tensors)
    shards = {f"diffusion_pytorch_model-0000{i}-of-00002.safetensors": names[i - 1 :: 2] for i in (1, 2)}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_decoy_index_beside_the_loaders_index_is_refused(model, tmp_path):
    """The review's experiment: `decoy.safetensors.index.json` (sorted first, all real shards) was
    the one checked, while diffusers reads `diffusion_pytorch_model.safetensors.index.json`,
    which names `evil.bin`, a pickle it would torch.load."""
    marker = tmp_path / "UNPICKLED"
    folder = model / "transformer"
    weight_map = _shard_in_two(folder, "decoy.safetensors.index.json")
    (folder / "evil.bin").write_bytes(pickle.dumps(_Trap(marker)))
    evil = {k: "evil.bin" for k in weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": evil}))
    with pytest.raises(ModelError, match=r"holds a pickle file \(evil.bin\)"):
        check_layout(model, ["transformer"])
    (folder / "evil.bin").rename(folder / "evil.data")  # no pickle suffix: two indexes are still refused
    with pytest.raises(ModelError, match=r"decoy.safetensors.index.json, diffusion_pytorch_model.safetensors.index.json, "
                                         r"but the loader reads only diffusion_pytorch_model.safetensors.index.json"):
        load_transformer(model, "high", "fp32")
    (folder / "decoy.safetensors.index.json").unlink()  # the loader's own index naming a non-safetensors shard
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "evil.data" for k in weight_map}}))
    with pytest.raises(ModelError, match=r"shard 'evil.data' is not a .safetensors file"):
        load_transformer(model, "high", "fp32")
    assert not marker.exists()


def test_index_under_another_name_and_pickle_beside_safetensors(model, tmp_path):
    folder = model / "vae"
    _shard_in_two(folder, "model.safetensors.index.json")  # transformers' name, not diffusers'
    with pytest.raises(ModelError, match=r"vae: shard index\(es\) model.safetensors.index.json, but the loader reads "
                                         r"only diffusion_pytorch_model.safetensors.index.json"):
        check_layout(model, ["vae"])
    marker = tmp_path / "UNPICKLED"
    (model / "text_encoder/pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))  # beside model.safetensors
    with pytest.raises(ModelError, match=r"text_encoder: holds a pickle file \(pytorch_model.bin\)"):
        check_layout(model, ["text_encoder"])
    assert not marker.exists()


def test_text_encoder_checks_the_file_transformers_opens_first(model):
    """transformers opens model.safetensors before model.safetensors.index.json: a broken single
    file is what must be caught, whatever the index says."""
    folder = model / "text_encoder"
    data = (folder / "model.safetensors").read_bytes()
    shutil.copy(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    index = {"weight_map": {k: "model-00001-of-00001.safetensors" for k in load_file(folder / "model.safetensors")}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ModelError, match=r"model.safetensors: truncated or padded"):
        check_layout(model, ["text_encoder"])


def test_auto_map_tokenizer_never_runs_its_code(model, tmp_path, monkeypatch):
    """The review's experiment: a tokenizer_config.json with auto_map and a .py beside it made
    transformers ask "Do you wish to run the custom code?"; answering yes ran it. The stand-in
    for that answer says yes whenever the caller did not say no (trust_remote_code=None)."""
    import transformers.dynamic_module_utils as dyn
    import transformers.models.auto.tokenization_auto as tokenization_auto

    marker = tmp_path / "RAN"
    folder = model / "tokenizer"
    (folder / "evil_tok.py").write_text(
        f"import os\nos.makedirs({str(marker)!r}, exist_ok=True)\n"
        "from transformers import T5Tokenizer\n\nclass EvilTokenizer(T5Tokenizer):\n    pass\n"
    )
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}}))
    monkeypatch.setattr(tokenization_auto, "resolve_trust_remote_code", lambda trust, *a, **k: trust is not False)
    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    with pytest.raises(ModelError, match=r"tokenizer_config.json: has auto_map, .*never runs a model folder's code"):
        make_token_counter(model)
    assert not marker.exists()
    # and were the check bypassed, transformers is told no: the folder's code still does not run
    monkeypatch.setattr("wanlora.models.loading._refuse_remote_code", lambda folder: None)
    make_token_counter(model)
    assert not marker.exists()


def test_auto_map_in_a_model_config_is_refused(model):
    cfg_path = model / "text_encoder/config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "modeling_evil.Evil"}}))
    with pytest.raises(ModelError, match=r"text_encoder/config.json: has auto_map"):
        load_text_encoder(model, "fp32")


def test_torch_with_the_weights_only_bypass_is_refused(model, monkeypatch):
    from wanlora.models import loading

    loading.require_safe_torch("2.6.0")
    loading.require_safe_torch("2.13.0+cpu")
    with pytest.raises(ModelError, match=r"torch 2.5.1\+cu124: .*CVE-2025-32434.*install torch>=2.6"):
        loading.require_safe_torch("2.5.1+cu124")
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    with pytest.raises(ModelError, match="torch 2.4.1"):
        loading.load_vae(model, "fp32")


def test_pyproject_requires_a_torch_without_the_bypass():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert "torch>=2.6" in project["dependencies"]


def _big_part(root, seed=0):
    """A part folder whose one shard holds 6 MiB of tensor data (more than the first and last MiB)."""
    folder = root / "transformer"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(1536, 1024, generator=g)}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    return folder / "diffusion_pytorch_model.safetensors"


def test_identity_sees_a_change_in_the_middle_of_a_shard(tmp_path):
    shard = _big_part(tmp_path / "a")
    before = model_identity(tmp_path / "a", "transformer")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, 3 MiB from either end
    shard.write_bytes(bytes(data))
    assert model_identity(tmp_path / "a", "transformer") != before


def test_identity_hashes_a_local_shard_once_and_trusts_hub_blobs(tmp_path, monkeypatch):
    """A local shard is hashed in full once per (size, mtime): the cache lives in the workspace's
    scratch/. A hub-cache file is named by the hub's sha256 of its content, so it is not read."""
    from wanlora.models import loading

    shard = _big_part(tmp_path / "local")
    ws = tmp_path / "ws"
    (ws / "scratch").mkdir(parents=True)
    monkeypatch.chdir(ws)
    reads = []
    real = loading.sha256_file
    monkeypatch.setattr(loading, "sha256_file", lambda p: reads.append(p.name) or real(p))
    first = model_identity(tmp_path / "local", "transformer")
    assert reads == ["diffusion_pytorch_model.safetensors"]
    cached = json.loads((ws / "scratch/model_hashes.json").read_text())
    assert [v["sha256"] for v in cached.values()] == [real(shard)]
    reads.clear()
    assert model_identity(tmp_path / "local", "transformer") == first and reads == []  # the next run reads nothing
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert model_identity(tmp_path / "local", "transformer") == first and reads == ["diffusion_pytorch_model.safetensors"]

    # the hub's layout: snapshots/<commit>/transformer/<file> -> ../../../blobs/<sha256>
    repo = tmp_path / "hub/models--o--m"
    snap = repo / "snapshots" / ("c" * 40) / "transformer"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    blob = repo / "blobs" / real(shard)
    shutil.copy(shard, blob)
    (snap / "diffusion_pytorch_model.safetensors").symlink_to(os.path.relpath(blob, snap))
    shutil.copy(shard.parent / "config.json", snap / "config.json")
    reads.clear()
    assert model_identity(snap.parent, "transformer") == first
    assert reads == []  # the shard itself is never read
