"""Which expert trains at each step, and where each expert's weights live.

Schedule. `alternate`: the active experts take turns, each for `switch_every` micro-batches,
counted as AI Toolkit counts them (SDTrainer.hook_train_loop checks `steps_this_boundary` before
every micro-batch of an accumulation window), so one optimizer step may hold micro-batches of both
experts: `switch_every: 1` with `gradient_accumulation: 2` trains both experts in every optimizer
step, as AI Toolkit's docs advise. Each expert keeps its own LoRA and optimizer and steps it on
the mean gradient of its own micro-batches of that step. The state is two integers (whose turn,
and micro-batches done in it), saved in every checkpoint at an optimizer-step boundary.
`proportional`: each optimizer step picks the high-noise expert with the probability of its
timestep band, from the trainer's generator, for all of its micro-batches.

Placement. On a CPU device both experts simply stay where they are. On a GPU, when both fit
(and `model.low_vram` is off) both stay on the GPU; otherwise the inactive expert waits in pinned
host memory. At a switch the outgoing expert's frozen tensors point back at their pinned host
mirror (`wanlora.models.accel.park_frozen`: no device-to-host copy after the first time) and the
incoming one is copied to the GPU from pinned memory (`non_blocking`: the host does not wait),
queued right after the outgoing expert's optimizer step, so the host prepares the next
micro-batch while it runs. The copy runs on the compute stream, not a side stream: the incoming
expert only fits once the outgoing one's memory is free, so there is no compute to overlap it
with, and on one stream (a) the new tensors reuse the blocks the parked expert just freed (a side
stream has its own pool and would make the allocator free and re-reserve 27 GB) and (b) the copy
cannot overwrite weights that queued kernels still read. Only frozen base weights travel; the small LoRA parameters and
their optimizer state stay on the GPU, so the optimizer's references remain valid.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Literal

import torch

from wanlora.config import EXPERTS, NO_EXPERT, Expert, Params
from wanlora.models.accel import park_frozen

Choice = Literal["alternate", "proportional"]
ORDER: tuple[Expert, ...] = EXPERTS


@dataclass
class ExpertSchedule:
    """Turn-taking between the active experts; `turn` and `done` are the resumable state."""

    active: tuple[Expert, ...]
    switch_every: int
    choice: Choice = "alternate"
    high_probability: float = 0.5
    turn: int = 0
    done: int = 0

    def __post_init__(self) -> None:
        if not self.active:  # params refuse this (`MultistageConfig`); a schedule built by hand may not
            raise ValueError(f"no expert selected: multistage.{NO_EXPERT}")
        self.active = tuple(e for e in ORDER if e in self.active)

    def take(self, micro_batches: int, generator: torch.Generator) -> list[Expert]:
        """The experts of the next optimizer step's `micro_batches` global micro-batches, in order."""
        if self.choice == "proportional":
            return [self.next_expert(generator)] * micro_batches
        experts = []
        for _ in range(micro_batches):
            experts.append(self.next_expert(generator))
            self.record(1)
        return experts

    def next_expert(self, generator: torch.Generator) -> Expert:
        """The expert of the next micro-batch (`alternate`; call `record` after it) or of the next
        optimizer step (`proportional`)."""
        if len(self.active) == 1:
            return self.active[0]
        if self.choice == "proportional":
            r = float(torch.rand((), generator=generator, dtype=torch.float64))
            return "high" if r < self.high_probability else "low"
        if self.done >= self.switch_every:
            self.turn, self.done = (self.turn + 1) % len(self.active), 0
        return self.active[self.turn]

    def record(self, micro_batches: int) -> None:
        """Count the micro-batches the current turn just ran."""
        self.done += micro_batches

    def upcoming(self) -> Expert | None:
        """The expert of the next turn when the current turn is complete (after `record`), so its
        weights can be fetched while the optimizer steps; None when nothing changes."""
        if self.choice == "alternate" and len(self.active) > 1 and self.done >= self.switch_every:
            return self.active[(self.turn + 1) % len(self.active)]
        return None

    def state_dict(self) -> dict[str, int]:
        return {"turn": self.turn, "done": self.done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.turn, self.done = int(state["turn"]), int(state["done"])


def plan_placement(active: Expert, experts: tuple[Expert, ...], device: torch.device,
                   both_fit: bool) -> dict[Expert, str]:
    """Where each loaded expert's base weights should be while `active` trains: 'device' or 'host'."""
    if device.type == "cpu" or both_fit:
        return {e: "device" for e in experts}
    return {e: ("device" if e == active else "host") for e in experts}


def both_fit(params: Params, models: dict[Expert, torch.nn.Module], device: torch.device) -> bool:
    """Whether every loaded expert can stay on the GPU with room for this run's activations.

    Asks `wanlora.plan`, whose memory model is calibrated on H100 measurements (two bf16 A14B
    experts at 33f@512² peak at 63.7 GiB: they fit an 80 GB card, which a fixed reserve of the
    card's memory wrongly denied, making every switch a transfer)."""
    if device.type != "cuda":
        return True
    if params.model.low_vram:
        return False
    from wanlora.plan import plan

    config = dict(next(iter(models.values())).config)
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return plan(params, gib, config=config).resident == "both"


Mover = Callable[[torch.nn.Module, str, bool], None]


def placement_parts(model: torch.nn.Module, skip: Collection[int]) -> tuple[list[torch.nn.Module], list[torch.Tensor]]:
    """What moves when an expert is placed: every child module except the transformer blocks in
    `skip` (ids of blocks that block offloading streams by itself), plus the frozen tensors held
    directly by the model (Wan's `scale_shift_table`)."""
    modules: list[torch.nn.Module] = []
    for name, child in model.named_children():
        if name == "blocks":
            modules += [b for b in child if id(b) not in skip]
        else:
            modules.append(child)
    own = [t for t in list(model._parameters.values()) + list(model._buffers.values())
           if t is not None and not t.requires_grad]
    return modules, own


def make_mover(device: torch.device, skip: Collection[int] = ()) -> Mover:
    """The placer's mover: frozen tensors swap to a pinned host mirror and back
    (`wanlora.models.accel.park_frozen`); LoRA weights stay put; offloaded blocks are left to
    the block offloader, so placing an expert never pulls all of its blocks onto the device."""

    def move(model: torch.nn.Module, where: str, non_blocking: bool) -> None:
        modules, own = placement_parts(model, skip)
        for m in modules:
            park_frozen(m, where, device, non_blocking)
        target = device if where == "device" else torch.device("cpu")
        for t in own:
            t.data = t.data.to(target, non_blocking=non_blocking)

    return move


def park_loaded(models: dict[Expert, torch.nn.Module], where: dict[Expert, str], fit: bool, mover: Mover) -> None:
    """Before another expert loads onto the device, park the experts already there unless all fit.

    With fitted 4-bit recovery every expert loads onto the device (calibration runs its forward
    there); without this the first would stay on the GPU while the second is quantized and
    fitted: +6.2 GiB over the first fit's 18 GiB at full size on the 24 GB tier, 24.8 GiB on the
    card in all (bench/RESULTS.md, second H200 session), more than a 24 GB card has."""
    if fit:
        return
    for e, model in models.items():
        if where.get(e) == "device":
            mover(model, "host", False)
            where[e] = "host"


@dataclass
class ExpertPlacer:
    """Applies `plan_placement` to the loaded experts, moving weights on the current stream."""

    models: dict[Expert, torch.nn.Module]
    device: torch.device
    fit: bool
    mover: Mover | None = None
    where: dict[Expert, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mover is None:
            self.mover = make_mover(self.device)

    def prepare(self, expert: Expert) -> None:
        """Queue the moves that let `expert` train next (the host does not wait for the copies)."""
        plan = plan_placement(expert, tuple(self.models), self.device, self.fit)
        for e in sorted(plan, key=lambda e: plan[e] == "device"):  # free memory before filling it
            if self.where.get(e) != plan[e]:
                self.mover(self.models[e], plan[e], plan[e] == "device")
                self.where[e] = plan[e]

    def activate(self, expert: Expert) -> torch.nn.Module:
        """Make sure `expert` is (queued to be) on the device and return it."""
        self.prepare(expert)
        return self.models[expert]
