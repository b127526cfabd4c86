"""The speed levers must not change what the expert computes: same outputs, same LoRA grads."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode

from wanlora.config import DEFAULT_TARGETS, parse_params
from wanlora.models.accel import AccelSettings, apply_accel, settings_from_params


def _tiny_expert(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=DEFAULT_TARGETS, init_lora_weights=False))
    return model


def _inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 4, 3, 8, 8, generator=g),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=g),
    }


def _out_and_grads(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


class _CountAttention(TorchDispatchMode):
    """Counts SDPA kernel launches (forward kernels only) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func) and "backward" not in str(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_levers_keep_outputs_and_grads_identical(mode: str) -> None:
    plain = _tiny_expert()
    fast = apply_accel(copy.deepcopy(plain), AccelSettings(checkpointing=mode))
    ref_out, ref_grads = _out_and_grads(plain, _inputs())
    out, grads = _out_and_grads(fast, _inputs())
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 10 * 2  # blocks x adapted linears (4+4+2) x (A, B)
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_state_dict_keys_unchanged() -> None:
    plain = _tiny_expert()
    keys = list(plain.state_dict())
    fast = apply_accel(plain, AccelSettings(checkpointing="selective"))
    assert list(fast.state_dict()) == keys
    assert type(fast.blocks[0]).__name__ == "AcceleratedWanTransformerBlock"
    assert type(fast.blocks[0]) is type(fast.blocks[1])  # one class: one compiled graph for all blocks


@pytest.mark.parametrize(("mode", "expected"), [("none", 0), ("full", 4), ("selective", 2)])
def test_backward_recomputes_only_what_the_mode_says(mode: str, expected: int) -> None:
    """2 blocks x (self + cross) attention = 4 forward SDPA calls; backward reruns those not kept.

    selective keeps both self-attentions and recomputes both cross-attentions.
    """
    model = apply_accel(_tiny_expert(), AccelSettings(checkpointing=mode))
    out = model(**_inputs(), return_dict=False)[0]
    with _CountAttention() as counter:
        out.float().pow(2).mean().backward()
    assert counter.calls == expected


def test_apply_twice_is_idempotent_and_replaces_diffusers_checkpointing() -> None:
    model = _tiny_expert()
    model.enable_gradient_checkpointing()
    apply_accel(model, AccelSettings(checkpointing="full"))
    apply_accel(model, AccelSettings(checkpointing="selective"))
    assert model.gradient_checkpointing is False
    assert type(model.blocks[0]).__mro__[1].__name__ == "WanTransformerBlock"
    assert model.blocks[0]._wanlora_checkpointing == "selective"


def test_rejects_a_model_without_blocks() -> None:
    with pytest.raises(ValueError, match="no transformer `blocks`"):
        apply_accel(torch.nn.Linear(2, 2), AccelSettings())


def test_bad_settings_name_the_choices() -> None:
    with pytest.raises(ValueError, match="use none, full or selective"):
        AccelSettings(checkpointing="some")  # type: ignore[arg-type]


def test_settings_follow_params() -> None:
    p = parse_params({"model": {"compile": True, "attention_backend": "cudnn"}, "train": {"gradient_checkpointing": True}})
    assert settings_from_params(p) == AccelSettings("selective", True, "cudnn")
    p = parse_params({"train": {"gradient_checkpointing": False}})
    assert settings_from_params(p).checkpointing == "none"
    assert settings_from_params(p, checkpointing="full").checkpointing == "full"
    assert settings_from_params(parse_params({"train": {"gradient_checkpointing": "full"}})).checkpointing == "full"
    p = parse_params({"model": {"compile": True, "layer_offloading": True}})
    assert settings_from_params(p).compile is False


def test_parking_keeps_one_host_copy_and_leaves_the_lora_alone() -> None:
    from wanlora.models.accel import park_frozen

    model = _tiny_expert()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora_ptrs = {n: p.data_ptr() for n, p in lora.items()}
    park_frozen(model, "host", torch.device("cpu"), False)
    flat = model._wanlora_host_flat
    frozen = [p for p in model.parameters() if not p.requires_grad]
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel()
    assert all(start <= p.data_ptr() < end for p in frozen)  # every frozen tensor lives in the mirror
    assert all(p.data_ptr() == lora_ptrs[n] for n, p in lora.items())  # LoRA not copied
    park_frozen(model, "device", torch.device("cpu"), False)
    park_frozen(model, "host", torch.device("cpu"), False)
    assert model._wanlora_host_flat is flat  # the mirror is made once, then reused
    after = model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)
    with pytest.raises(ValueError, match="use 'host' or 'device'"):
        park_frozen(model, "disk", torch.device("cpu"), False)


class _FakeCudart:
    """Records `cudaHostRegister` / `cudaHostUnregister` calls, as a CPU stand-in for CUDA."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        self.registered[ptr] = nbytes
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0


def test_a_host_mirror_is_unregistered_when_its_last_tensor_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    """A freed host mirror must not stay registered with CUDA: on an H200, `bench/gpu_smoke.py`'s
    EMA resume check failed with "CUDA error: invalid argument" in the checkpoint's `.cpu()` copies
    after earlier trainers' mirrors had been freed while still registered (the C library reused
    their addresses). The registration now lives exactly as long as some tensor uses the memory."""
    import gc

    from wanlora.models.accel import park_frozen

    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    model = _tiny_expert()
    park_frozen(model, "host", torch.device("cpu"), False)
    ((address, nbytes),) = fake.registered.items()
    kept = next(p for p in model.parameters() if not p.requires_grad)
    assert address <= kept.data_ptr() < address + nbytes
    del model
    gc.collect()
    assert fake.unregistered == []  # a frozen weight still lives in the mirror: keep it page-locked
    del kept
    gc.collect()
    assert fake.unregistered == [address]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_copies_to_the_host_work_after_pinned_buffers_are_freed() -> None:
    """The GPU side of the test above: host memory freed while registered and handed out again
    made device-to-host copies fail ("CUDA error: invalid argument")."""
    from wanlora.models.activation_offload import pinned_buffer

    src = torch.randn(24 << 20, device="cuda")  # 96 MiB: spans a freed 64 MiB buffer and more
    for size in (64 << 20, 128 << 20, 64 << 20):
        buf = pinned_buffer(size)
        buf.fill_(1)
        del buf
        copies = [src.cpu(), src[: 8 << 20].cpu()]
        torch.cuda.synchronize()
        assert all(torch.equal(c, src[: c.numel()].cpu()) for c in copies)


def test_experts_share_one_host_arena_and_keep_their_gradients() -> None:
    """Two experts that train in turn stage their activations in one host arena: each forward
    reuses it from the start (two arenas would pin both experts' activations), and the gradients
    equal those of runs without offloading."""
    from wanlora.models import activation_offload as ao

    ao._STAGING.clear()
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)))
    x = torch.randn(32, 64)
    plain = []
    for m in models:
        m(x).square().sum().backward()
        plain.append([p.grad.clone() for p in m.parameters()])
        m.zero_grad()
    offloads = [ao.ActivationOffload(m, min_bytes=1) for m in models]
    for i in (0, 1, 0, 1):
        with offloads[i]:
            y = models[i](x)
        y.square().sum().backward()
    arena = ao._STAGING[torch.device("cpu")].arena
    assert offloads[1].offloaded_bytes > 0 and len(arena.chunks) == 1 and arena.index == 0
    assert arena.offset < offloads[0].offloaded_bytes + offloads[1].offloaded_bytes  # the last forward's alone
    for m, want in zip(models, plain):
        assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(m.parameters(), want))  # two steps each


def test_activation_offloading_leaves_quanto_weights_alone() -> None:
    """optimum-quanto's qfloat8 weights are tensor subclasses that wrap their codes and have no
    storage of their own: reading one's storage stopped the first forward of a qfloat8 expert
    with model.activation_offloading on. Found by review of the GPU levers."""
    from wanlora.models.activation_offload import ActivationOffload
    from wanlora.models.quant import quantize_transformer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    quantize_transformer(model, "qfloat8", exclude=(), device="cpu")
    x = torch.randn(8, 64, requires_grad=True)
    model(x).square().sum().backward()
    want, x.grad = x.grad, None
    offload = ActivationOffload(model, min_bytes=1)
    with offload:
        y = model(x)
    y.square().sum().backward()
    assert offload.offloaded_bytes > 0 and torch.equal(x.grad, want)


def test_parking_a_qfloat8_expert_is_refused_with_the_fix() -> None:
    """quanto's weights ignore `t.data =`, so a parked qfloat8 expert would silently stay on the GPU
    (found by review of the GPU path); the mover names the working settings instead."""
    from wanlora.errors import UserError
    from wanlora.models.accel import park_frozen
    from wanlora.models.quant import quantize_transformer

    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_transformer(model, "qfloat8", exclude=(), device="cpu")
    for where in ("host", "device"):
        with pytest.raises(UserError, match="qfloat8 experts cannot move.*use float8"):
            park_frozen(model, where, torch.device("cpu"), False)


def test_fetching_an_nf4_weight_brings_its_quantization_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """bitsandbytes keeps an nf4 weight's absmax and code beside the tensor, not in it: a fetch
    that moved only the codes left them in host memory for the GPU kernel (the expert that waits
    in host memory is quantized there). Found by review of the GPU path. `cpu:0` is not the CPU
    tensors' device as far as the mover can tell, so the fetch runs on a CPU-only machine."""
    from bitsandbytes.functional import QuantState

    from wanlora.models.accel import park_frozen
    from wanlora.models.quant import quantize_transformer

    model = torch.nn.Sequential(torch.nn.Linear(64, 32, dtype=torch.bfloat16))
    quantize_transformer(model, "nf4", exclude=(), device="cpu")
    moved = []
    monkeypatch.setattr(QuantState, "to", lambda self, device: moved.append(device))
    target = torch.device("cpu", 0)
    park_frozen(model, "host", target, False)
    assert moved == []  # parked: the small state stays where it is
    park_frozen(model, "device", target, False)
    assert moved == [target]


def test_activation_offloading_moves_activations_not_weights_and_keeps_grads() -> None:
    """With checkpointing off every block activation is saved through autograd's hooks: each large
    one must go through host memory (counted) while no weight is moved, and the LoRA gradients
    must equal the plain run's bit for bit, also when backward unpacks out of pack order."""
    from wanlora.models.activation_offload import ActivationOffload, offload_context
    from wanlora.train.step import StepBatch, training_step

    plain = _tiny_expert()
    fast = apply_accel(copy.deepcopy(plain), AccelSettings(checkpointing="none", activation_offloading=True))
    offload = offload_context(fast)
    assert isinstance(offload, ActivationOffload)
    offload.min_bytes, offload.ahead_bytes = 4096, 3 * 4096  # tiny tensors: offload them, prefetch a few
    weights = {p.untyped_storage().data_ptr() for p in fast.parameters()}
    moved = []
    real_pack = offload._pack

    def pack(t: torch.Tensor):
        out = real_pack(t)
        if out is not t:
            moved.append(t.untyped_storage().data_ptr())
        return out

    offload._pack = pack  # type: ignore[method-assign]
    inputs = _inputs()
    g = torch.Generator().manual_seed(3)
    batch = StepBatch(latents=inputs["hidden_states"], noise=torch.randn(1, 4, 3, 8, 8, generator=g),
                      timesteps=torch.tensor([700.0]), embeds=inputs["encoder_hidden_states"])
    for model in (plain, fast):
        model.zero_grad(set_to_none=True)
        training_step(model, batch, dtype=torch.float32)
    held = offload.records
    assert len(held) > 10 and offload.offloaded_bytes == sum(h.nbytes for h in held)
    assert all(h.used and h.fetched is None for h in held)  # each came back once, nothing lingers
    assert not weights & set(moved)  # frozen weights are saved too, never moved
    assert len(held) < len(moved)  # a tensor that several ops save crosses once
    for (n, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), n
    offload.max_host_bytes = offload.offloaded_bytes // 2  # a cap: the rest stays where it is
    for model in (plain, fast):
        model.zero_grad(set_to_none=True)
        training_step(model, batch, dtype=torch.float32)
    assert 0 < offload.offloaded_bytes <= offload.max_host_bytes
    for (n, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), n
    assert offload_context(apply_accel(fast, AccelSettings())) is None  # turned off again


def test_activation_offloading_under_compiled_selective_blocks() -> None:
    """The GPU configuration: compiled blocks save their inputs and attention outputs through the
    hooks too, and their backward asserts the saved layouts, so offloaded copies must keep strides."""
    from wanlora.models.activation_offload import offload_context
    from wanlora.train.step import StepBatch, training_step

    plain = apply_accel(_tiny_expert(), AccelSettings(checkpointing="selective", compile=True))
    fast = apply_accel(_tiny_expert(), AccelSettings(checkpointing="selective", compile=True,
                                                     activation_offloading=True))
    offload_context(fast).min_bytes = 1024
    inputs = _inputs()
    g = torch.Generator().manual_seed(3)
    batch = StepBatch(latents=inputs["hidden_states"], noise=torch.randn(1, 4, 3, 8, 8, generator=g),
                      timesteps=torch.tensor([700.0]), embeds=inputs["encoder_hidden_states"])
    for model in (plain, fast):
        training_step(model, batch, dtype=torch.float32)
    held = offload_context(fast).records
    assert any(h.host.shape == (1, 48, 32) for h in held)  # a block input (48 tokens x 32 wide)
    assert any(not h.host.is_contiguous() for h in held)  # a permuted layout came back as it went
    for (n, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), n
