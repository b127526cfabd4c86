"""The one safetensors module: deterministic bytes from both writers, one header check for every
reader (LoRAs included), and the trainer's weight reader held to the loader's shard rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanlora import tensorfiles
from wanlora.export.formats import LoraFormatError
from wanlora.models.loading import ModelError


def test_streamed_writer_bytes_do_not_depend_on_metadata_order(tmp_path: Path):
    """The streamed writer (quantized experts, recovery corrections) kept the metadata in insertion
    order, so the same settings built in another order gave another file; now every header is
    written with sorted keys, as `to_bytes` writes LoRAs and caches."""
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "q": torch.arange(4, dtype=torch.uint8)}
    tensorfiles.save_streamed(tmp_path / "a.safetensors", tensors, {"mode": "uint4", "group": "16"})
    tensorfiles.save_streamed(tmp_path / "b.safetensors", tensors, {"group": "16", "mode": "uint4"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_a_truncated_lora_is_refused_at_its_header(tmp_path: Path):
    """The LoRA header reader checked only the header; a file cut short in its data passed, and
    only a later tensor read failed. One reader now checks the table against the file size for
    model shards and LoRAs alike."""
    data = tensorfiles.to_bytes({"a.lora_A.weight": torch.ones(4, 8)}, {"k": "v"})
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-16])
    with pytest.raises(LoraFormatError, match=r"cut.safetensors: truncated or padded"):
        tensorfiles.read_header(path, LoraFormatError)
    path.write_bytes(data)
    table, meta = tensorfiles.read_header(path, LoraFormatError)
    assert meta == {"k": "v"} and table["a.lora_A.weight"]["shape"] == [4, 8]


def test_recovery_weights_follow_the_loaders_shard_rules(tmp_path: Path):
    """`recovery.weights_from_safetensors` parsed the first `*.index.json` itself and opened any
    shard it named, a path outside the folder included; it now takes the loader's files, so a
    forged index (or a pickle beside the weights) is refused as loading refuses it."""
    from wanlora.models.recovery import weights_from_safetensors

    outside = tmp_path / "secret.safetensors"
    save_file({"blocks.0.attn1.to_q.weight": torch.ones(2, 2)}, outside)
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"blocks.0.attn1.to_q.weight": "../secret.safetensors"}}))
    with pytest.raises(ModelError, match=r"shard '../secret.safetensors' is not a .safetensors file in"):
        weights_from_safetensors(folder)
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    save_file({"blocks.0.attn1.to_q.weight": torch.full((2, 2), 3.0)}, folder / "diffusion_pytorch_model.safetensors")
    assert torch.equal(weights_from_safetensors(folder)("blocks.0.attn1.to_q"), torch.full((2, 2), 3.0))
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelError, match=r"holds a pickle file \(pytorch_model.bin\)"):
        weights_from_safetensors(folder)
