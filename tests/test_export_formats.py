"""Key formats: ours <-> ComfyUI <-> musubi, diffusers loading, peer imports, refusals."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from _helpers import forward, merged, random_lora, save_ours, tiny_pipeline
from wanlora.config import DEFAULT_TARGETS
from wanlora import tensorfiles
from wanlora.export import formats
from wanlora.export.formats import MODULE_NAMES, LoraFormatError, LoraModule
from wanlora.export.imports import import_lora, import_to_file, read_lora
from wanlora.models.geometry import TINY, WAN22_A14B
from wanlora.models.tiny import tiny_expert


def _same(a: dict[str, LoraModule], b: dict[str, LoraModule]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up), k
        assert a[k].alpha == b[k].alpha, k


def test_module_names_agree_with_diffusers_native_checkpoint_loader():
    """Our native<->diffusers table is what diffusers uses to load native (ComfyUI) Wan weights."""
    for diffusers_name, native_name in MODULE_NAMES:
        native_key = native_name.format(n=7) + ".weight"
        converted = convert_wan_transformer_to_diffusers({native_key: torch.zeros(1)})
        assert list(converted) == [diffusers_name.format(n=7) + ".weight"], native_name


def test_round_trip_ours_comfy_musubi_is_lossless():
    lora = random_lora(tiny_expert(1), seed=5, rank=4, alpha=2.0)
    comfy = formats.write_comfy(lora)
    assert "diffusion_model.blocks.1.self_attn.o.lora_down.weight" in comfy
    assert "diffusion_model.blocks.0.ffn.0.lora_up.weight" in comfy
    assert "diffusion_model.head.head.alpha" in comfy
    assert "diffusion_model.time_projection.1.lora_down.weight" in comfy
    assert comfy["diffusion_model.blocks.0.cross_attn.k.alpha"].item() == 2.0
    back = formats.read_native(comfy)
    _same(lora, back)
    musubi = formats.write_musubi(back)
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in musubi
    assert "lora_unet_text_embedding_0.alpha" in musubi
    again = formats.read_kohya(musubi)
    _same(lora, again)
    sd, meta = formats.write_ours(again)
    _same(lora, formats.read_ours(sd, meta))
    assert formats.write_comfy(formats.read_ours(sd, meta)).keys() == comfy.keys()


def test_comfy_file_passes_comfyui_loader_key_check():
    """ComfyUI's loader (comfy/lora.py): for native Wan, key_map holds `diffusion_model.<name>` for
    every `diffusion_model.<name>.weight` of the model; `load_lora` takes `<x>.lora_up.weight`,
    `<x>.lora_down.weight`, `<x>.alpha` for each x in key_map and warns about any other key. So
    every key must be consumed, and each up@down must have the target weight's shape. The native
    weight names come from diffusers' native-checkpoint converter, independent of our table."""
    model = tiny_expert(1)
    weights = {k: v.shape for k, v in model.state_dict().items()}
    comfy = formats.write_comfy(random_lora(model, seed=1))
    modules = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.removesuffix(".alpha") for k in comfy}
    consumed = set()
    for x in modules:
        assert x.startswith("diffusion_model.")
        native_weight = x.removeprefix("diffusion_model.") + ".weight"
        (diffusers_key,) = convert_wan_transformer_to_diffusers({native_weight: torch.zeros(1)})
        assert diffusers_key in weights, f"{x} would not be applied to any weight"
        up, down = comfy[f"{x}.lora_up.weight"], comfy[f"{x}.lora_down.weight"]
        assert (up.flatten(1) @ down.flatten(1)).numel() == weights[diffusers_key].numel()
        assert up.shape[0] == weights[diffusers_key][0] and down.shape[1] == weights[diffusers_key][1]
        assert comfy[f"{x}.alpha"].dim() == 0
        consumed |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.alpha"}
    assert consumed == set(comfy), "ComfyUI would skip: " + ", ".join(sorted(set(comfy) - consumed))
    assert len(modules) == 2 * 10 + 7  # q,k,v,o x2 + ffn.0/2 per block; 7 layers outside blocks


@pytest.mark.parametrize("kind", ["diffusers", "comfyui"])
def test_exported_files_load_in_diffusers_and_reproduce_the_lora(tmp_path: Path, kind: str):
    """Both experts: diffusers' loader applies our files exactly as W + alpha/rank * up @ down.

    diffusers reads ComfyUI files only for block layers (its converter rejects alphas outside
    blocks), so the ComfyUI case uses the default targets; ComfyUI itself takes all of them."""
    pipe = tiny_pipeline()
    targets = None if kind == "diffusers" else list(DEFAULT_TARGETS)
    loras = {"high": random_lora(pipe.transformer, seed=11, alpha=2.0, targets=targets),
             "low": random_lora(pipe.transformer_2, seed=12, rank=2, alpha=8.0, targets=targets)}
    expected = {"high": forward(merged(pipe.transformer, loras["high"])),
                "low": forward(merged(pipe.transformer_2, loras["low"]))}
    base_high = forward(pipe.transformer)
    for expert, lora in loras.items():
        path = tmp_path / f"{expert}.safetensors"
        if kind == "diffusers":
            save_ours(path, lora)
        else:
            tensorfiles.save(path, formats.write_comfy(lora), {})
        pipe.load_lora_weights(str(path), adapter_name=expert, load_into_transformer_2=expert == "low")
    got_high, got_low = forward(pipe.transformer), forward(pipe.transformer_2)
    assert (got_high - base_high).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(got_high, expected["high"], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(got_low, expected["low"], atol=2e-4, rtol=1e-3)


def test_unknown_keys_are_listed_not_dropped(tmp_path: Path):
    comfy = formats.write_comfy(random_lora(tiny_expert(1), seed=1, targets=["to_q"]))
    comfy["diffusion_model.blocks.0.self_attn.norm_q.lora_down.weight"] = torch.zeros(4, 32)
    comfy["diffusion_model.blocks.0.self_attn.norm_q.lora_up.weight"] = torch.zeros(32, 4)
    comfy["diffusion_model.blocks.0.mystery"] = torch.zeros(1)
    path = tmp_path / "odd.safetensors"
    tensorfiles.save(path, comfy, {})
    with pytest.raises(LoraFormatError) as err:
        read_lora(path)
    msg = str(err.value)
    assert "3 key(s)" in msg and "blocks.0.self_attn.norm_q.lora_down.weight" in msg and "mystery" in msg


def test_export_of_an_unmappable_module_raises():
    lora = {"blocks.0.norm2": LoraModule(torch.zeros(2, 32), torch.zeros(32, 2), 2.0)}
    with pytest.raises(LoraFormatError, match="no ComfyUI .* name for diffusers module 'blocks.0.norm2'"):
        formats.write_comfy(lora)


class _Boom:
    def __reduce__(self):
        return (os.mkdir, (str(Path(os.environ["BOOM_DIR"]) / "pwned"),))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin"])
def test_pickle_files_are_refused_unopened(tmp_path: Path, monkeypatch, suffix: str):
    monkeypatch.setenv("BOOM_DIR", str(tmp_path))
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(LoraFormatError, match="refused.*pickles that can run code"):
        import_lora(path, TINY)
    assert not (tmp_path / "pwned").exists()


def test_lora_for_another_base_model_is_rejected(tmp_path: Path):
    other = tiny_expert(1, attention_head_dim=8)  # inner dim 16 instead of 32
    path = tmp_path / "other_high_noise.safetensors"
    tensorfiles.save(path, formats.write_comfy(random_lora(other, seed=2, targets=["to_q", "ffn.net.2"])), {})
    with pytest.raises(LoraFormatError) as err:
        import_lora(path, TINY)
    msg = str(err.value)
    assert "does not fit the base model (6 layer(s))" in msg  # to_q of attn1 and attn2, ffn.net.2; 2 blocks
    assert "blocks.0.attn1.to_q: LoRA takes 16 inputs to 16 outputs, the base layer 32 to 32" in msg
    assert "blocks.1.ffn.net.2: LoRA takes 64 inputs to 16 outputs, the base layer 64 to 32" in msg
    # ... and the same file fits its own base
    sd, meta = import_lora(path, {**TINY, "attention_head_dim": 8})
    assert meta["wanlora.expert"] == "high" and meta["wanlora.imported_format"] == "comfyui/ai-toolkit"
    assert len(sd) == 12


def test_full_size_base_check_rejects_a_tiny_lora(tmp_path: Path):
    path = tmp_path / "tiny.safetensors"
    save_ours(path, random_lora(tiny_expert(1), seed=2, targets=["to_q"]))
    msg = "blocks.0.attn1.to_q: LoRA takes 32 inputs to 32 outputs, the base layer 5120 to 5120"
    with pytest.raises(LoraFormatError, match=msg):
        import_lora(path, WAN22_A14B)


def test_ai_toolkit_files_import_with_alpha_equal_rank(tmp_path: Path):
    """AI Toolkit: native names, peft spelling, no alpha; a combined file marks experts by
    `.transformer_1.` / `.transformer_2.`."""
    high = random_lora(tiny_expert(1), seed=3, targets=["to_q", "to_out.0"])
    low = random_lora(tiny_expert(2), seed=4, targets=["to_q", "to_out.0"])
    combined = {}
    for marker, lora in (("transformer_1.", high), ("transformer_2.", low)):
        for module, m in lora.items():
            native = formats.to_native_name(module)
            combined[f"diffusion_model.{marker}{native}.lora_A.weight"] = m.down
            combined[f"diffusion_model.{marker}{native}.lora_B.weight"] = m.up
    path = tmp_path / "my_lora_000001000.safetensors"
    tensorfiles.save(path, combined, {"name": "my_lora"})
    with pytest.raises(LoraFormatError, match="holds both experts"):
        import_lora(path, TINY)
    for expert, lora in (("high", high), ("low", low)):
        sd, meta = import_lora(path, TINY, expert=expert)
        got = formats.read_ours(sd, meta)
        assert sorted(got) == sorted(lora)
        for k, m in got.items():
            assert torch.equal(m.up, lora[k].up) and m.alpha == m.rank == 4  # alpha absent -> rank
        assert meta["wanlora.expert"] == expert
        assert '"name": "my_lora"' in meta["wanlora.imported_metadata"]


def test_musubi_import_keeps_alpha(tmp_path: Path):
    lora = random_lora(tiny_expert(2), seed=6, rank=4, alpha=1.0, targets=["to_k", "ffn.net.0.proj"])
    path = tmp_path / "wan22_low_noise.safetensors"
    tensorfiles.save(path, formats.write_musubi(lora), {"ss_network_module": "networks.lora_wan"})
    sd, meta = import_lora(path, TINY)
    assert meta["wanlora.imported_format"] == "musubi-tuner" and meta["wanlora.expert"] == "low"
    _same(lora, formats.read_ours(sd, meta))
    out = import_to_file(path, tmp_path / "ours.safetensors", TINY)
    again, _, kind = read_lora(out)
    assert kind == "ours"
    _same(lora, again)


def test_import_keeps_only_allowlisted_foreign_header_keys(tmp_path: Path):
    """Issue 22: `import-lora` copied a foreign file's whole header (dataset folders, absolute
    paths, tag counts, someone else's wanlora lineage) into ours. Only names, versions and shape
    information survive (cf. AI Toolkit's ui_scripts/merge_loras.py, which keeps version, format,
    ss_base_model_version and software)."""
    lora = random_lora(tiny_expert(2), seed=6, rank=4, alpha=1.0, targets=["to_k"])
    path = tmp_path / "downloaded_low_noise.safetensors"
    foreign = {"ss_network_module": "networks.lora_wan", "ss_base_model_version": "wan_2.2_14b",
               "ss_output_name": "their_lora", "name": "their_lora", "software": "x" * 2000,
               "ss_dataset_dirs": '{"/home/bob/private/clips": {"n_repeats": 1}}',
               "ss_tag_frequency": '{"1_sks": {"sks": 40}}', "ss_sd_model_name": "/home/bob/models/wan.safetensors",
               "wanlora.lineage_version": "2", "wanlora.samples": '[{"path": "data/raw/bob.mp4"}]'}
    tensorfiles.save(path, formats.write_musubi(lora), foreign)
    _, meta = import_lora(path, TINY)
    assert json.loads(meta["wanlora.imported_metadata"]) == {
        "name": "their_lora", "ss_base_model_version": "wan_2.2_14b", "ss_network_module": "networks.lora_wan",
        "ss_output_name": "their_lora"}  # software: too long to be a name or a version
    assert "/home/bob" not in json.dumps(meta) and "wanlora.lineage_version" not in meta


def test_peft_named_file_without_alpha(tmp_path: Path):
    """Made elsewhere: diffusers' default alpha = rank; our own checkpoint: an error, not a guess."""
    lora = random_lora(tiny_expert(1), seed=8, rank=4, alpha=1.0, targets=["to_v"])
    sd, _ = formats.write_ours(lora)
    path = tmp_path / "plain_diffusers.safetensors"
    tensorfiles.save(path, sd, {})
    with pytest.raises(LoraFormatError, match="names no LoRA alpha"):
        read_lora(path)
    sd2, meta = import_lora(path, TINY)
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 4.0
    assert torch.equal(sd2["transformer.blocks.1.attn2.to_v.lora_B.weight"], lora["blocks.1.attn2.to_v"].up)


def _with_alpha_pattern(tmp_path: Path, pattern: dict) -> Path:
    """A diffusers-format LoRA (peft keys) whose header's adapter config carries `pattern`."""
    lora = random_lora(tiny_expert(1), seed=3, rank=4, alpha=4.0, targets=["to_v"])
    sd, _ = formats.write_ours(lora)
    cfg = {"transformer.r": 4, "transformer.lora_alpha": 4.0, "transformer.alpha_pattern": pattern}
    path = tmp_path / "foreign.safetensors"
    tensorfiles.save(path, sd, {"lora_adapter_metadata": json.dumps(cfg)})
    return path


def test_alpha_pattern_is_matched_literally(tmp_path: Path):
    lora, _, _ = read_lora(_with_alpha_pattern(tmp_path, {"blocks.1.attn2.to_v": 2.0, "o_v": 8.0}))
    assert lora["blocks.1.attn2.to_v"].alpha == 2.0  # full name
    assert lora["blocks.0.attn2.to_v"].alpha == 4.0  # 'o_v' is not a whole-name suffix: lora_alpha
    lora, _, _ = read_lora(_with_alpha_pattern(tmp_path, {"attn2.to_v": 1.0}))
    assert {m.alpha for name, m in lora.items() if name.endswith("attn2.to_v")} == {1.0}
    with pytest.raises(LoraFormatError, match=r"alpha_pattern key '\(' is not a module name"):
        read_lora(_with_alpha_pattern(tmp_path, {"(": 1.0}))  # was re.error


def test_redos_alpha_pattern_fails_fast(tmp_path: Path):
    """The review's experiment: a crafted alpha_pattern hung import-lora at 100% CPU (killed at
    30 s). The read runs in a subprocess, since a regex cannot be interrupted from Python."""
    import subprocess
    import sys

    path = _with_alpha_pattern(tmp_path, {r"(([\w.]*)*)*!": 2.0})
    code = ("import sys\nfrom pathlib import Path\nfrom wanlora.export.imports import read_lora\n"
            "try:\n    read_lora(Path(sys.argv[1]))\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30,
                         env={**os.environ}, cwd=tmp_path)
    assert "LoraFormatError" in out.stdout and "is not a module name" in out.stdout, out.stdout + out.stderr[-2000:]
