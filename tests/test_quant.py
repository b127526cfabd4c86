"""Quantization modes: exact rounding, LoRA training through every mode, no fusion, on-disk cache."""

from __future__ import annotations

import json

import pytest
import torch
from _quant_helpers import tiny_expert, tiny_inputs
from peft import LoraConfig
from safetensors import safe_open
from torch import nn

from wanlora.config import DEFAULT_TARGETS
from wanlora.models import quant
from wanlora.models.quant import (
    Float8Linear,
    FusionRefused,
    UInt4Linear,
    dequantized_weight,
    forbid_fusion,
    quant_kind,
    quantize_cached,
    quantize_module,
    quantize_transformer,
    quantized_modules,
)
from wanlora.tensorfiles import save_streamed

CPU_MODES = ["float8", "qfloat8", "nf4", "uint4"]
GROUP = {"uint4": 16, "nf4": 64, "float8": 64, "qfloat8": 64}
BLOCK_LINEARS = 20  # 2 blocks x (4 self-attn + 4 cross-attn + 2 ffn)


def _linear(weight: torch.Tensor, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=weight.dtype)
    lin.weight.data.copy_(weight)
    return lin


def test_uint4_rounds_like_torchao_by_hand():
    # group [-1.5, 0, 0.75, 6]: scale = (6 - -1.5)/15 = 0.5, zero point = -round(-1.5/0.5) = 3,
    # codes = round(w/0.5) + 3 with round-half-to-even: 0.75/0.5 = 1.5 -> 2, so 0.75 comes back as 1.0
    w = torch.tensor([[-1.5, 0.0, 0.75, 6.0], [0.0, 1.5, 3.0, 7.5]], dtype=torch.bfloat16)
    q = UInt4Linear.quantize(_linear(w), group_size=4, device=torch.device("cpu"))
    assert q.zero_point.tolist() == [[3], [0]]  # an all-positive group keeps 0 representable: zp 0
    assert q.dequantize().tolist() == [[-1.5, 0.0, 1.0, 6.0], [0.0, 1.5, 3.0, 7.5]]
    assert q.qweight.numel() == 4  # 8 codes, two per byte


def test_float8_per_channel_scale_and_bias():
    w = torch.tensor([[448.0, -224.0, 1.0], [0.5, 0.25, -0.125]], dtype=torch.bfloat16)
    lin = _linear(w, bias=True)
    q = Float8Linear.quantize(lin, torch.device("cpu"))
    # row absmax maps onto e4m3's 448: scales 1.0 and 0.5/448; both rows are exact in e4m3
    assert torch.equal(q.dequantize(), w)
    x = torch.randn(3, 3, dtype=torch.bfloat16)
    assert torch.equal(q(x), lin(x))
    q.to(torch.float32)  # a dtype cast must not touch the stored codes and scales
    assert q.qweight.dtype == torch.uint8 and torch.equal(q.dequantize(), w)


def test_uint4_leaves_indivisible_layers_bf16():
    model = tiny_expert()
    quantize_transformer(model, "uint4", group_size=64)  # in_features 32 is not a multiple of 64
    kinds = {name: quant_kind(m) for name, m in quantized_modules(model).items()}
    assert set(kinds) == {f"blocks.{b}.ffn.net.2" for b in range(2)}  # the only in_features=64 layers


@pytest.mark.parametrize("mode", CPU_MODES)
def test_lora_trains_on_every_mode(mode):
    model = tiny_expert()
    ref = model(**tiny_inputs())[0]
    quantize_transformer(model, mode, group_size=GROUP[mode])
    qmods = quantized_modules(model)
    assert len(qmods) == BLOCK_LINEARS and {quant_kind(m) for m in qmods.values()} == {mode}
    assert not any(k.startswith(("condition_embedder", "proj_out")) for k in qmods)
    err = ((model(**tiny_inputs())[0].float() - ref.float()).norm() / ref.float().norm()).item()
    assert 0 < err < (0.2 if mode in ("nf4", "uint4") else 0.05)

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=DEFAULT_TARGETS, init_lora_weights=False))
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(".lora_" in n for n in lora)
    out = model(**tiny_inputs())[0]
    loss = out.float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)
    # the quantized bases survived injection, wrapped by peft
    assert len(quantized_modules(model)) == BLOCK_LINEARS


@pytest.mark.parametrize("mode", ["float8", "qfloat8"])
def test_text_encoder_modes(mode):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    enc = UMT5EncoderModel(cfg).eval()
    ids = torch.randint(0, 64, (1, 12))
    ref = enc(input_ids=ids).last_hidden_state
    quantize_module(enc, mode)
    assert len(quantized_modules(enc)) == 2 * 7  # q k v o, wi_0 wi_1 wo per layer
    got = enc(input_ids=ids).last_hidden_state
    assert 0 < ((got - ref).norm() / ref.norm()).item() < 0.05


def test_bad_text_encoder_mode():
    with pytest.raises(ValueError, match="quantization.text_encoder: unknown quantization mode 'nf4'"):
        quantize_module(nn.Linear(4, 4), "nf4")  # type: ignore[arg-type]


def test_fusion_is_refused():
    model = tiny_expert()
    quantize_transformer(model, "uint4", group_size=16)
    model.add_adapter(LoraConfig(r=2, target_modules=DEFAULT_TARGETS))
    assert forbid_fusion(model) == BLOCK_LINEARS
    with pytest.raises(FusionRefused, match="refusing to merge a LoRA into a quantized base"):
        model.fuse_lora()


@pytest.mark.parametrize("mode", CPU_MODES)
def test_cache_round_trip_skips_requantizing(mode, tmp_path, monkeypatch):
    key = {"source": "tiny", "seed": 0}
    first = quantize_cached(tiny_expert, tmp_path, key, mode, group_size=GROUP[mode])
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    record = json.loads((entry / "quant.json").read_text())
    assert record["key"]["mode"] == mode and len(record["modules"]) == BLOCK_LINEARS
    with safe_open(str(entry / "weights.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["wanlora_quant"]) == record["key"]

    def boom(*a, **k):
        raise AssertionError("cache hit must not quantize")

    monkeypatch.setattr(quant, "quantize_transformer", boom)
    second = quantize_cached(tiny_expert, tmp_path, key, mode, group_size=GROUP[mode])
    x = tiny_inputs()
    assert torch.equal(first(**x)[0], second(**x)[0])
    for name, m in quantized_modules(first).items():
        assert torch.equal(dequantized_weight(m), dequantized_weight(second.get_submodule(name)))
    # other layer choices are another cache entry, never a stale reuse
    with pytest.raises(AssertionError, match="cache hit must not quantize"):
        quantize_cached(tiny_expert, tmp_path, key, mode, group_size=GROUP[mode], exclude=("blocks.1.*",))


def test_cache_rejects_a_model_it_does_not_fit(tmp_path):
    model = tiny_expert()
    quantize_transformer(model, "float8")
    folder = quant.save_quantized(model, tmp_path / "e", {"k": 1})
    other = nn.Module()
    other.blocks = nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"cached layer blocks\.0\.attn1\.to_k does not fit this model; delete the folder"):
        quant.load_quantized(other, folder)


def test_save_streamed_reads_back(tmp_path):
    tensors = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.arange(7, dtype=torch.uint8),
        "c": torch.tensor(2.5),
        "d": torch.randn(4).to(torch.float8_e4m3fn),
    }
    save_streamed(tmp_path / "t.safetensors", tensors, {"note": "x"})
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "x"}
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


def test_group_size_is_checked_per_mode():
    with pytest.raises(ValueError, match=r"nf4 takes block sizes \(32, 64, .*\); use 64"):
        quantize_transformer(tiny_expert(), "nf4", group_size=16)
    with pytest.raises(ValueError, match="uint4 needs an even group size"):
        quantize_transformer(tiny_expert(), "uint4", group_size=15)


def test_fp8_matmul_path_close_and_trains():
    from wanlora.models.quant import enable_fp8_matmul

    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    q = Float8Linear.quantize(lin, torch.device("cpu"))
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    slow = q(x)
    slow.float().sum().backward()
    grad_slow, x.grad = x.grad.clone(), None
    q.fp8_matmul = True
    fast = q(x)
    fast.float().sum().backward()
    rel = ((fast.float() - slow.float()).norm() / slow.float().norm()).item()
    assert 0 < rel < 0.08  # activations rounded to e4m3 (3 mantissa bits): a few percent
    assert torch.equal(x.grad, grad_slow)  # backward to x uses the dequantised weight, like the bf16 path

    model = tiny_expert()
    quantize_transformer(model, "float8")
    assert enable_fp8_matmul(model) == BLOCK_LINEARS
    model.add_adapter(LoraConfig(r=2, target_modules=DEFAULT_TARGETS, init_lora_weights=False))
    model(**tiny_inputs())[0].float().pow(2).mean().backward()
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("mode, ratio", [("float8", 0.5), ("qfloat8", 0.5), ("nf4", 0.25), ("uint4", 0.25)])
def test_weight_bytes_counts_quantized_storage(mode, ratio):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256, bias=False)).to(torch.bfloat16)
    before = quant.weight_bytes(model)
    quantize_transformer(model, mode, group_size=64)
    # codes plus per-channel / per-group scales (4-bit: ~1/32 overhead at groups of 64)
    assert before * ratio <= quant.weight_bytes(model) <= before * ratio * 1.1


@pytest.mark.parametrize("mode", ["float8", "uint4"])
def test_cache_hit_with_a_partial_loader_reads_no_bf16_linear(mode, tmp_path):
    """On a hit the partial loader is asked only for what the cache lacks; the model it returns
    (cached linears on meta) ends up equal to quantizing a fully loaded expert."""
    key = {"source": "tiny", "seed": 0}
    asked = []

    def partial(skip: frozenset[str]) -> nn.Module:
        asked.append(skip)
        model = tiny_expert()
        for name in skip:
            model.get_submodule(name).to_empty(device="meta")
        return model

    first = quantize_cached(tiny_expert, tmp_path, key, mode, group_size=GROUP[mode], partial_loader=partial)
    assert asked == []  # a miss loads everything: the quantizer needs the bf16 weights
    second = quantize_cached(tiny_expert, tmp_path, key, mode, group_size=GROUP[mode], partial_loader=partial)
    assert asked == [frozenset(quantized_modules(first))] and len(asked[0]) == BLOCK_LINEARS
    assert not any(p.is_meta for p in second.parameters())
    x = tiny_inputs()
    assert torch.equal(first(**x)[0], second(**x)[0])

    def lacking(skip: frozenset[str]) -> nn.Module:  # a model with a linear the cache never held
        model = partial(skip)
        model.proj_out.to_empty(device="meta")
        return model

    with pytest.raises(ValueError, match="the cache does not hold proj_out.weight; delete the folder"):
        quantize_cached(tiny_expert, tmp_path, key, mode, group_size=GROUP[mode], partial_loader=lacking)
