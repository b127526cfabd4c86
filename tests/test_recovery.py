"""Accuracy recovery: closed-form optimality, AI Toolkit adapters, calibration on the tiny expert."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _quant_helpers import tiny_expert, tiny_inputs
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from bench.recovery_report import anisotropic, recovery_report
from wanlora.config import DEFAULT_TARGETS
from wanlora.models.quant import dequantized_weight, is_quantized, quantize_transformer, quantized_modules
from wanlora.models.recovery import (
    adapter_targets,
    corrections,
    distill_block,
    fit_correction,
    fit_model,
    load_aitk_adapter,
    read_aitk_adapter,
    reference_block,
    weights_from_model,
)


def _err(E: torch.Tensor, A: torch.Tensor, B: torch.Tensor, X: torch.Tensor) -> float:
    return float(((E - B.double() @ A.double()) @ X).norm())


def _case(out=12, inp=10, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    Wq = W + 0.1 * torch.randn(out, inp, generator=g, dtype=torch.float64)
    X = anisotropic(n, inp, seed=seed, dtype=torch.float64).T  # (in, n), eigenvalues ~ k^-2
    return W, Wq, X


def _als(E: torch.Tensor, C: torch.Tensor, rank: int, iters: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent solver: alternating least squares on ||(E - BA) C^1/2||, from a random start."""
    B = torch.randn(E.shape[0], rank, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for _ in range(iters):
        A = torch.linalg.solve(B.T @ B, B.T @ E)
        B = torch.linalg.solve(A @ C @ A.T, A @ C @ E.T).T
    return A, B


def test_fit_is_the_closed_form_optimum():
    W, Wq, X = _case()
    E, C = W - Wq, X @ X.T
    A, B = fit_correction(W, Wq, X, rank=3, ridge=1e-12)
    assert A.shape == (3, 10) and B.shape == (12, 3)
    A2, B2 = _als(E, C, 3)
    closed, als = _err(E, A, B, X), _err(E, A2, B2, X)
    assert closed <= als * (1 + 1e-5) and als <= closed * (1 + 1e-3)
    # first-order optimality: both partial gradients of ||(E - BA)X||^2 vanish
    R = E - B.double() @ A.double()
    scale = float(E.norm() * C.norm())
    assert float((R @ C @ A.double().T).norm()) / scale < 1e-6
    assert float((B.double().T @ R @ C).norm()) / scale < 1e-6


@pytest.mark.parametrize("n", [4, 40])  # 4 samples of 10 features: rank-deficient covariance
def test_fit_never_increases_calibration_error(n):
    for seed in range(5):
        W, Wq, X = _case(n=n, seed=seed)
        for rank in (1, 3, 10):
            A, B = fit_correction(W, Wq, X, rank)
            before = float(((W - Wq) @ X).norm())
            assert _err(W - Wq, A, B, X) <= before * (1 + 1e-9)
        if n == 4:  # rank 4 >= rank of X: the correction can cancel the error on X entirely
            A, B = fit_correction(W, Wq, X, 4)
            assert _err(W - Wq, A, B, X) < 1e-3 * before


def test_plain_svd_is_optimal_for_identity_inputs():
    W, Wq, _ = _case()
    E = W - Wq
    u, s, vh = torch.linalg.svd(E, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young
    for X in (None, torch.eye(10, dtype=torch.float64)):
        A, B = fit_correction(W, Wq, X, 3)
        assert torch.allclose(B.double() @ A.double(), best, atol=1e-5)
    A, B = fit_correction(W, Wq, None, 3)
    assert abs(float((E - B.double() @ A.double()).norm()) - float(s[3:].norm())) < 1e-5


def test_whitening_wins_on_anisotropic_inputs_and_holds_out():
    W, Wq, _ = _case(out=24, inp=20)
    E = W - Wq
    # calibration and held-out samples from one distribution (eigenvalues k^-2, one basis)
    X_all = anisotropic(400, 20, seed=5, dtype=torch.float64).T
    X, X_held = X_all[:, :200], X_all[:, 200:]
    Aw, Bw = fit_correction(W, Wq, X, 4)
    Ap, Bp = fit_correction(W, Wq, None, 4)
    for data in (X, X_held):
        base = float((E @ data).norm())
        white, plain = _err(E, Aw, Bw, data) / base, _err(E, Ap, Bp, data) / base
        assert white < 0.5 * plain < 0.5  # whitened fit removes most of the visible error


# ------------------------------------------------------------------------ AI Toolkit adapters
def _write_adapter(path, rank=3, seed=0):
    """An adapter in AI Toolkit's saved form: combined experts, native Wan names, alpha keys."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    layers = {"blocks.0.self_attn.q": (32, 32), "blocks.0.ffn.0": (32, 64), "blocks.1.cross_attn.o": (32, 32), "blocks.1.ffn.2": (64, 32)}
    for t in ("transformer_1", "transformer_2"):
        for name, (i, o) in layers.items():
            key = f"diffusion_model.{t}.{name}"
            sd[f"{key}.lora_A.weight"] = (0.1 * torch.randn(rank, i, generator=g)).to(torch.bfloat16)
            sd[f"{key}.lora_B.weight"] = (0.1 * torch.randn(o, rank, generator=g)).to(torch.bfloat16)
            sd[f"{key}.alpha"] = torch.tensor(float(rank) * 4)  # ignored, as AI Toolkit ignores it
    save_file(sd, str(path))
    return sd


def test_aitk_adapter_effect_is_wq_x_plus_bax(tmp_path):
    path = tmp_path / "ara.safetensors"
    sd = _write_adapter(path)
    targets = adapter_targets(str(path), "high")
    assert targets == ["blocks.0.attn1.to_q", "blocks.0.ffn.net.0.proj", "blocks.1.attn2.to_out.0", "blocks.1.ffn.net.2"]
    model = tiny_expert()
    quantize_transformer(model, "uint4", group_size=16, exclude=(), include=targets)
    assert sorted(quantized_modules(model)) == targets  # AI Toolkit: everything else stays bf16
    assert load_aitk_adapter(model, str(path), "high") == targets

    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    layer = model.get_submodule("blocks.0.attn1.to_q")
    down = sd["diffusion_model.transformer_1.blocks.0.self_attn.q.lora_A.weight"]
    up = sd["diffusion_model.transformer_1.blocks.0.self_attn.q.lora_B.weight"]
    expected = F.linear(x, dequantized_weight(layer), layer.bias) + F.linear(F.linear(x, down), up)
    assert torch.equal(layer(x), expected)

    # the low-noise expert gets transformer_2's tensors
    low = read_aitk_adapter(sd, "low")
    assert torch.equal(low["blocks.1.ffn.net.2"][0], sd["diffusion_model.transformer_2.blocks.1.ffn.2.lora_A.weight"])

    # a LoRA trains beside it; the correction is never a parameter nor saved with the LoRA
    model.add_adapter(LoraConfig(r=2, target_modules=DEFAULT_TARGETS))
    assert torch.equal(model.get_submodule("blocks.0.attn1.to_q").base_layer(x), expected)
    assert not any("recovery" in k for k in get_peft_model_state_dict(model))
    assert not any("recovery" in k for k in model.state_dict())
    assert not any("recovery" in n for n, _ in model.named_parameters())
    model(**tiny_inputs())[0].float().pow(2).mean().backward()


def test_aitk_adapter_diffusers_keys_and_errors(tmp_path):
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    sd = {"transformer.blocks.0.attn2.to_k.lora_A.weight": a, "transformer.blocks.0.attn2.to_k.lora_B.weight": b}
    assert list(read_aitk_adapter(sd, None)) == ["blocks.0.attn2.to_k"]
    both = {f"diffusion_model.transformer_{i}.blocks.0.self_attn.q.lora_A.weight": a for i in (1, 2)}
    with pytest.raises(ValueError, match="holds both Wan 2.2 experts"):
        read_aitk_adapter(both, None)
    with pytest.raises(ValueError, match="has only lora_A; the file is incomplete"):
        read_aitk_adapter(both, "high")
    with pytest.raises(ValueError, match="'blocks.0.x.lokr_w1' is not a LoRA down/up weight"):
        read_aitk_adapter({"blocks.0.x.lokr_w1": a}, None)
    path = tmp_path / "a.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="blocks.0.attn2.to_k is not quantized"):
        load_aitk_adapter(tiny_expert(), str(path), None)
    with pytest.raises(FileNotFoundError, match="owner/repo/file.safetensors"):
        adapter_targets(str(tmp_path / "missing.safetensors"), "high")


# ------------------------------------------------------------------------ calibration
def test_fit_model_recovers_on_the_tiny_expert():
    ref = tiny_expert()
    q = tiny_expert()
    quantize_transformer(q, "uint4", group_size=16)
    calib = [tiny_inputs(seed=s, frames=3) for s in (1, 2)]
    held = [tiny_inputs(seed=s, frames=3) for s in (3, 4)]
    fitted = fit_model(weights_from_model(ref), q, calib, rank=8)
    assert sorted(fitted) == sorted(quantized_modules(q)) and len(corrections(q)) == 20
    report = recovery_report(ref, q, calib, held)
    for split in ("calib", "heldout"):
        assert all(b[split].after < b[split].before for b in report.blocks)
        assert report.model[split].after < 0.8 * report.model[split].before
    improved = sum(p["calib"].after < p["calib"].before for p in report.layers.values())
    assert improved == 20
    assert "| model output |" in report.table()

    block = q.blocks[0]
    from wanlora.models.recovery import capture_block_inputs

    inputs = capture_block_inputs(ref, calib)
    before, after = distill_block(block, reference_block(block, weights_from_model(ref), "blocks.0."), inputs, steps=5)
    assert after < before
    assert all(is_quantized(m) for m in quantized_modules(q).values())
    assert isinstance(reference_block(block, weights_from_model(ref), "blocks.0.").attn1.to_q, nn.Linear)


# ------------------------------------------------------------------------ the trainer's entry point
def test_prepare_expert_with_aitk_adapter_then_cached(tmp_path, monkeypatch):
    from wanlora.config import QuantizationConfig
    from wanlora.models import quant
    from wanlora.models.expert import prepare_quantized_expert

    path = tmp_path / "ara.safetensors"
    _write_adapter(path)
    cfg = QuantizationConfig(transformer=f"uint4|{path}", group_size=16, cache_dir=str(tmp_path / "q"))
    assert cfg.recovery.source == str(path)  # AI Toolkit's qtype spelling
    first = prepare_quantized_expert(tiny_expert, cfg, "low", {"model": "tiny"})
    assert sorted(quantized_modules(first)) == sorted(corrections(first)) == adapter_targets(str(path), "low")
    monkeypatch.setattr(quant, "quantize_transformer", lambda *a, **k: pytest.fail("cache hit must not quantize"))
    second = prepare_quantized_expert(tiny_expert, cfg, "low", {"model": "tiny"})
    x = tiny_inputs()
    assert torch.equal(first(**x)[0], second(**x)[0])
    with pytest.raises(ValueError, match="trained against uint4 weights; set quantization.transformer: uint4"):
        prepare_quantized_expert(tiny_expert, cfg.model_copy(update={"transformer": "nf4"}), "low", {})


def test_prepare_expert_fits_once_then_loads_corrections(tmp_path, monkeypatch):
    from wanlora.config import QuantizationConfig
    from wanlora.models import recovery
    from wanlora.models.expert import prepare_quantized_expert

    cfg = QuantizationConfig(transformer="uint4", group_size=16, cache_dir=str(tmp_path / "q"),
                             recovery={"source": "fitted", "rank": 4, "calibration_samples": 2})
    ref = tiny_expert()
    calib = [tiny_inputs(seed=s) for s in (1, 2, 3)]
    first = prepare_quantized_expert(tiny_expert, cfg, "high", {"model": "tiny"},
                                     weights=weights_from_model(ref), calib_inputs=calib)
    assert len(corrections(first)) == 20
    monkeypatch.setattr(recovery, "fit_model", lambda *a, **k: pytest.fail("fitted corrections must be reused"))
    second = prepare_quantized_expert(tiny_expert, cfg, "high", {"model": "tiny"},
                                      weights=weights_from_model(ref), calib_inputs=calib)
    x = tiny_inputs(seed=9)
    assert torch.equal(first(**x)[0], second(**x)[0])
    with pytest.raises(ValueError, match="needs calibration inputs and the original weights"):
        prepare_quantized_expert(tiny_expert, cfg, "high", {"model": "other"})
    # the sampler: no calibration data, the trainer's corrections reused as they are
    sampled = prepare_quantized_expert(tiny_expert, cfg, "high", {"model": "tiny"}, reuse_only=True)
    assert torch.equal(first(**x)[0], sampled(**x)[0])
    other_rank = cfg.model_copy(update={"recovery": cfg.recovery.model_copy(update={"rank": 8})})
    bare = prepare_quantized_expert(tiny_expert, other_rank, "high", {"model": "tiny"}, reuse_only=True)
    assert corrections(bare) == {}  # none fitted for these settings: the plain quantized base, warned


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_weights_from_safetensors_reads_a_diffusers_folder(tmp_path, shard):
    from wanlora.models.recovery import weights_from_safetensors

    model = tiny_expert()
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert bool(list(tmp_path.glob("*.index.json"))) == bool(shard)
    load = weights_from_safetensors(tmp_path)
    for name in ("blocks.1.ffn.net.2", "condition_embedder.time_proj"):
        assert torch.equal(load(name), model.get_submodule(name).weight)
    with pytest.raises(KeyError, match="no tensor blocks.9.attn1.to_q.weight"):
        load("blocks.9.attn1.to_q")


def test_hub_adapter_is_fetched_at_a_revision_and_its_hash_recorded(tmp_path, monkeypatch, capsys):
    """AI Toolkit's hub form was downloaded from whatever `main` was, and nothing recorded which
    file was used. Now the revision is passed (pinned with @, else main), and the identity names
    the commit it resolved to and the file's sha256 (the hub's blob name, as in its cache)."""
    import hashlib
    import os

    import huggingface_hub

    from wanlora.models.recovery import resolve_adapter_source

    calls = []
    commits = {"main": "a" * 40, "v1": "b" * 40, "b" * 40: "b" * 40}

    def fake_download(repo_id, filename, revision=None, **kw):  # the hub cache's layout
        calls.append((repo_id, filename, revision))
        repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
        data = f"adapter at {commits[revision]}".encode()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        snap = repo / "snapshots" / commits[revision]
        snap.mkdir(parents=True, exist_ok=True)
        if not (snap / filename).is_symlink():
            (snap / filename).symlink_to(os.path.relpath(blob, snap))
        return str(snap / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    resolve_adapter_source.cache_clear()
    src = "ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors"
    unpinned = resolve_adapter_source(src)
    assert calls[-1] == ("ostris/accuracy_recovery_adapters", "wan22_14b_t2i_torchao_uint4.safetensors", "main")
    sha_main = hashlib.sha256(f"adapter at {'a' * 40}".encode()).hexdigest()
    assert unpinned.identity == f"ostris/accuracy_recovery_adapters@{'a' * 40}/wan22_14b_t2i_torchao_uint4.safetensors#{sha_main}"
    printed = "".join(capsys.readouterr().err.split())  # rich wraps long lines anywhere
    assert f"Pinit:quantization.recovery.source:{src}@{'a' * 40}" in printed
    pinned = resolve_adapter_source(f"{src}@{'b' * 40}")
    assert calls[-1][2] == "b" * 40 and ("b" * 40) in pinned.identity and pinned.identity != unpinned.identity
    assert "not pinned" not in capsys.readouterr().err
    local = tmp_path / "ara.safetensors"
    _write_adapter(local)
    assert resolve_adapter_source(str(local)).identity == f"ara.safetensors#{hashlib.sha256(local.read_bytes()).hexdigest()}"
    resolve_adapter_source.cache_clear()
