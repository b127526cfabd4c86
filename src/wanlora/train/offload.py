"""Block offloading (model.layer_offloading): transformer blocks live in host memory and visit
the device only for their own forward and backward.

A simple, correct version, not a fast one: each offloaded block's frozen weights are copied to
the device when the block runs and dropped back to their pinned host mirror when it is done
(`wanlora.models.accel.park_frozen`), synchronously. Backward needs
the weights again, so an offloaded block always runs under (non-reentrant) activation
checkpointing whose recomputed function loads the weights first; a hook on the block's input
gradient sends them back once the block's backward has finished. The LoRA parameters (trainable)
never move, so gradients and optimizer state stay where the optimizer expects them. Whatever
is still on the device when a step ends (the first block has no input gradient to hook) is sent
back by `release()`, which the loop calls after each expert's optimizer step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from wanlora.models.accel import park_frozen


def _plain_forward(block: torch.nn.Module) -> Callable[..., Any]:
    """The block class's own forward, skipping a checkpointing subclass (offloading checkpoints
    the block itself; doing it twice would recompute twice)."""
    cls = type(block)
    if cls.__name__.startswith("Accelerated"):
        cls = cls.__mro__[1]
    return functools.partial(cls.forward, block)


class BlockOffload:
    """Offload the first `fraction` of `expert.blocks` to host memory (see the module doc)."""

    def __init__(self, expert: torch.nn.Module, device: torch.device, fraction: float = 1.0,
                 mover: Callable[[torch.nn.Module, str], None] | None = None) -> None:
        self.mover = mover or (lambda m, where: park_frozen(m, where, device, False))
        count = round(len(expert.blocks) * fraction)
        self.blocks = list(expert.blocks)[:count]
        self.on_device: set[int] = set()
        for i, block in enumerate(self.blocks):
            self.mover(block, "host")
            block.forward = functools.partial(self._forward, i, _plain_forward(block))

    def _load(self, i: int) -> None:
        if i not in self.on_device:
            self.mover(self.blocks[i], "device")
            self.on_device.add(i)

    def _unload(self, i: int) -> None:
        if i in self.on_device:
            self.mover(self.blocks[i], "host")
            self.on_device.discard(i)

    def _forward(self, i: int, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            self._load(i)
            return inner(*a, **k)

        if not torch.is_grad_enabled():
            out = run(*args, **kwargs)
        else:
            out = checkpoint(run, *args, use_reentrant=False, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: self._unload(i))
        self._unload(i)
        return out

    def release(self) -> None:
        """Send every offloaded block back to host memory."""
        for i in sorted(self.on_device):
            self._unload(i)
