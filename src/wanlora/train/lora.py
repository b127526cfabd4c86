"""One peft LoRA per expert: inject, read out under diffusers key names, save, scale, EMA.

The two experts never share an adapter: each gets its own `LoraConfig` injection and its own
file, so the low-noise file loads with diffusers' `load_lora_weights(..., load_into_transformer_2=True)`
and the high-noise file with the plain call. Keys are what diffusers' `save_lora_weights` writes:
peft's names (`blocks.0.attn1.to_q.lora_A.weight`) behind the `transformer.` prefix, and the
adapter config goes in the `lora_adapter_metadata` header so loaders apply alpha/rank exactly.

Master weights are float32 whatever the model dtype or the base's quantization (peft's default,
and AI Toolkit's and musubi's): an AdamW update at lr 2e-5 is far below half a bf16 ulp of a
LoRA-A weight (|w| up to 1/sqrt(in_features)), so bf16 LoRA weights round most updates away
(measured: 65% of element updates lost, weights moved 47% as far as in float32). Gradients,
optimizer state and EMA shadows follow the parameters' dtype, so they are float32 too. The
matmul itself still runs in the compute dtype: each LoRA linear casts its weight to the input's
dtype inside its forward (`ComputeDtypeLinear`), a cast of a few KB that torch.compile fuses into
the block, and peft's cast of the activations up to the weight's dtype is turned off (it would
run the LoRA matmul in float32 and keep a float32 copy of every block input for backward).
Files are written in `save.dtype`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from wanlora.config import NetworkConfig
from wanlora.tensorfiles import to_bytes as safetensors_bytes

PREFIX = "transformer."
ADAPTER = "default"


class ComputeDtypeLinear(torch.nn.Linear):
    """A LoRA A or B linear whose float32 master weight is cast to the input's dtype for the
    matmul: gradients flow back through the cast into the float32 weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def add_lora(expert: torch.nn.Module, net: NetworkConfig) -> list[torch.nn.Parameter]:
    """Inject a fresh LoRA into `expert` (base frozen) and return its trainable parameters.

    The LoRA tensors are float32 masters on every device and base (module doc); the update is
    computed in the dtype of the activations the layer receives (the model dtype). peft's default
    init makes B zero, so the untrained adapter leaves the expert's output unchanged.
    """
    from peft.tuners.lora import LoraLayer

    expert.requires_grad_(False)
    expert.add_adapter(
        LoraConfig(r=net.rank, lora_alpha=net.alpha, lora_dropout=net.dropout,
                   target_modules=list(net.target_modules), init_lora_weights=True),
        adapter_name=ADAPTER,
    )
    for layer in expert.modules():
        if isinstance(layer, LoraLayer):
            layer.cast_input_dtype_enabled = False  # keep x in the compute dtype (module doc)
            for linears in (layer.lora_A, layer.lora_B):
                for linear in linears.values():
                    if type(linear) is torch.nn.Linear:
                        linear.__class__ = ComputeDtypeLinear
    params = [p for n, p in expert.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(
            f"network.target_modules={net.target_modules} matched no module of the expert; "
            "use diffusers names such as to_q, to_k, to_v, to_out.0, ffn.net.0.proj, ffn.net.2"
        )
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def adapter_metadata(net: NetworkConfig) -> dict[str, object]:
    """The LoraConfig fields diffusers rebuilds the adapter from on load."""
    return {"r": net.rank, "lora_alpha": net.alpha, "lora_dropout": net.dropout,
            "target_modules": sorted(net.target_modules), "use_dora": False, "bias": "none"}


def lora_state_dict(expert: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The expert's LoRA tensors under diffusers file names (`transformer.` + peft name)."""
    sd = get_peft_model_state_dict(expert, adapter_name=ADAPTER)
    return {PREFIX + k: v for k, v in sd.items()}


def load_lora_state_dict(expert: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put LoRA tensors (file names, as `lora_state_dict` gives them) back into the expert."""
    unprefixed = {k.removeprefix(PREFIX): v for k, v in state.items()}
    result = set_peft_model_state_dict(expert, unprefixed, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA tensors do not fit this expert: unexpected keys {sorted(unexpected)[:4]}")


def base_model_version(variant: str) -> dict[str, str]:
    """The kohya-style header key LoRA catalogues sort by, with the value AI Toolkit writes
    (BaseSDTrainProcess.update_training_metadata, `get_base_model_version` of its Wan 2.2 models:
    "wan_2.2_5b" for TI2V 5B, "wan_2.2_14b" for both A14B models, I2V inheriting T2V's). Its
    companion ss_output_name (the job name) is added by the export, which is named after the job:
    in the training files it would make a rename of the job retrain."""
    return {"ss_base_model_version": "wan_2.2_5b" if variant == "ti2v-5b" else "wan_2.2_14b"}


def lora_file_bytes(tensors: dict[str, torch.Tensor], dtype: torch.dtype, net: NetworkConfig,
                    metadata: dict[str, str]) -> bytes:
    """A LoRA .safetensors file as bytes: tensors cast to `dtype`, diffusers' header keys plus ours,
    sealed with the sha256 of the tensors as saved (`wanlora.export.lineage.seal`)."""
    from wanlora.export.lineage import seal

    header = {"format": "pt",
              "lora_adapter_metadata": json.dumps({PREFIX + k: v for k, v in adapter_metadata(net).items()},
                                                  indent=2, sort_keys=True),
              **metadata}
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sorted(tensors.items())}
    return safetensors_bytes(out, metadata=seal(out, header))


@contextmanager
def lora_disabled(expert: torch.nn.Module) -> Iterator[None]:
    """Run the frozen base: DOP's prior prediction, and the scale-0 check."""
    expert.disable_adapters()
    try:
        yield
    finally:
        expert.enable_adapters()


class Ema:
    """Exponential moving average of one expert's LoRA tensors (fp32 shadows on the same device).

    Updated after each optimizer step of its own expert, so an expert that waits while the other
    trains does not decay toward a stale copy.
    """

    def __init__(self, expert: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in lora_state_dict(expert).items()}

    @torch.no_grad()
    def update(self, expert: torch.nn.Module) -> None:
        for k, v in lora_state_dict(expert).items():
            self.shadow[k].lerp_(v.detach().float().to(self.shadow[k].device), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take a saved state (read from the checkpoint on the CPU) onto the shadows' own device:
        left on the CPU, every later update would copy the whole LoRA off the GPU."""
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the LoRA: keys {sorted(missing)[:4]}")
        self.shadow = {k: state[k].to(self.shadow[k].device, torch.float32, copy=True) for k in self.shadow}
