"""The train stage: setup, train, save_checkpoint, load_checkpoint. The loop reads top to bottom.

One `Trainer` (a plain dataclass, no hierarchy) holds everything a step touches; the helpers
beside the loop are small and named. Per optimizer step: the schedule names the expert of each
of its `gradient_accumulation` micro-batches (both experts when a turn ends inside the step);
per expert, its weights come to the device and `optimizer_step` (`wanlora.train.step`, one
screen) runs its micro-batches and steps its own optimizer at the scheduled learning rate, then
the next expert's weights are queued; every `save.every` steps both LoRA files and the full
training state are written. A run that finds a
state for the same resolved params and inputs in `scratch/train/<key>/` continues from it and
produces the same losses and the same LoRA bytes as a run that was never interrupted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanlora.config import Expert, Params
from wanlora.data.captions import dropout_texts
from wanlora.data.dataset import Encode, TrainData, build_dataset, epoch_batches, small_buckets
from wanlora.data.split import HELD_OUT_REASON
from wanlora.errors import UserError, rebuild_fix
from wanlora.io import sha256_file, sha256_json
from wanlora.models.condition import check_last_frame, model_input
from wanlora.models.loading import DTYPES
from wanlora.models.text import encoder_identity, load_text_embeds, pad_embeds
from wanlora.models.variant import Variant, resolve_variant
from wanlora.pipeline import CAPTION_MANIFEST, LORA, SAMPLES, SPLIT_FILE, TRAIN_LIVE, TRAIN_PERF, stage_values
from wanlora.pipeline import TEXT_CACHE as TEXT_DIR
from wanlora.report import InputError, console, write_problems
from wanlora.train import checkpoint as ckpt
from wanlora.train.dist_checkpoint import ExpertParts, load_parallel_checkpoint, save_parallel_checkpoint
from wanlora.train.dist_parallel import ParallelPlan, make_groups, plan_parallel, world_metrics
from wanlora.train.distributed import (
    Cursor, DistEnv, DistributedError, GlobalBatch, derive_seed, distributed, init_distributed, rank_share,
    shard, take_batches,
)
from wanlora.train.experts import ExpertPlacer, ExpertSchedule, both_fit, make_mover, park_loaded
from wanlora.train.lora import Ema, add_lora, base_model_version, lora_file_bytes
from wanlora.train.monitor import Monitor, peak_memory_gib
from wanlora.train.offload import BlockOffload
from wanlora.train.flowmatch import add_noise
from wanlora.train.optim import build_optimizer, check_optimizer
from wanlora.train.preview import make_previewer, preview_due, publish_previews, render_preview
from wanlora.train.sequence_parallel import check_model_degree, check_world, enable_sequence_parallel, make_sequence_group
from wanlora.train import ti2v
from wanlora.train.step import StepBatch, StepOutcome, optimizer_step
from wanlora.train.timesteps import TimestepDistribution, expert_band

# Where the run trains, not what it computes: a run resumes on another GPU count or device.
PLACEMENT_KEYS = ("train.gpus", "job.device", "train.sequence_parallel")


class BadLossError(UserError, RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class Trainer:
    params: Params
    workspace: Path
    device: torch.device
    dtype: torch.dtype
    data: TrainData
    experts: dict[Expert, torch.nn.Module]
    optimizers: dict[Expert, torch.optim.Optimizer]
    emas: dict[Expert, Ema]
    dists: dict[Expert, TimestepDistribution]
    schedule: ExpertSchedule
    placer: ExpertPlacer
    offloads: list[BlockOffload]
    state_dir: Path
    base_identity: dict[Expert, str]  # content identity of each expert's weights (`model_identity`)
    expect_encoder: str | None
    variant: Variant  # the Wan 2.2 model the folder holds (`wanlora.models.variant`)
    env: DistEnv = field(default_factory=DistEnv)
    plan: ParallelPlan | None = None
    groups: dict[Expert, object] = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    position: int = 0
    bad_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    _batches: tuple[int, list[list[int]]] | None = None


# ------------------------------------------------------------------------------ helpers
def run_key(params: Params, workspace: Path, base: Mapping[str, str]) -> str:
    """Folder name of this run's resumable state: a hash of the params the train stage declares
    (so editing sample prompts does not throw away a half-trained run, and the key cannot drift from
    what DVC reruns the stage for), of its input manifests and of `base`, the identity of each
    expert trained (new weights at the same path start a new run)."""
    read = {k: v for k, v in stage_values("train", params).items() if k not in PLACEMENT_KEYS}
    inputs = {f: sha256_file(workspace / f)
              for f in (SAMPLES, CAPTION_MANIFEST, SPLIT_FILE)}
    return sha256_json({"params": read, "inputs": inputs, "base": dict(sorted(base.items()))})[:16]


def _adapter(params: Params) -> dict[str, str]:
    """The AI Toolkit recovery adapter's identity (hub commit and sha256), when one is used."""
    source = params.quantization.recovery.source
    if params.quantization.transformer == "none" or source in ("fitted", "none"):
        return {}
    from wanlora.models.recovery import resolve_adapter_source

    return {"adapter": resolve_adapter_source(source).identity}


def _load_expert(root: Path, expert: Expert, params: Params, workspace: Path, device: torch.device,
                 dtype: torch.dtype, where: torch.device, calib: list[dict] | None) -> tuple[torch.nn.Module, list[BlockOffload]]:
    """Load into `where` (the device, or host memory for an expert that waits), quantize with its
    recovery, add the LoRA (always on the device), checkpointing and block offloading, in that order."""
    from wanlora.models.accel import apply_accel, settings_from_params
    from wanlora.models.expert import load_base

    model = load_base(root, expert, params, workspace, where, calib, work=device)
    torch.manual_seed(params.job.seed + (0 if expert == "high" else 1))  # LoRA A init: same every run
    for p in add_lora(model, params.network):  # float32 masters, on the device (train.lora)
        p.data = p.data.to(device)
    if params.quantization.transformer != "none":
        from wanlora.models.quant import forbid_fusion

        forbid_fusion(model)  # merging into a quantized base drops the LoRA (quanto) or breaks (4-bit)
    apply_accel(model, settings_from_params(params))
    offloads = []
    if params.model.layer_offloading and device.type == "cuda":
        offloads.append(BlockOffload(model, device, params.model.layer_offloading_fraction))
    return model.train(), offloads


def _calibration_inputs(data: TrainData, dist: TimestepDistribution, workspace: Path, params: Params,
                        expect_encoder: str, device: torch.device, dtype: torch.dtype) -> list[dict] | None:
    """Forward kwargs for fitting 4-bit recovery: the first cached samples, noised at timesteps of
    the expert's band, with their captions, on `device` and in the base's `dtype` as a training
    step feeds them (the expert's forward takes no float32 latents into a bf16 patch embedding).
    Drawn from a generator of their own, so calibration does not shift the training stream."""
    q = params.quantization
    if q.transformer not in ("nf4", "uint4") or q.recovery.source != "fitted":
        return None
    g = torch.Generator().manual_seed(params.job.seed + 7)
    out = []
    for i in range(min(q.recovery.calibration_samples, len(data.items))):
        x0, cond = data.inputs(i, g)
        x0 = x0[None]
        t = dist.sample(1, g)
        emb = pad_embeds([load_text_embeds(workspace / TEXT_DIR, data.items[i].caption, expect_encoder)])
        xt = model_input(add_noise(x0, torch.randn(x0.shape, generator=g), t), None if cond is None else cond[None])
        out.append({"hidden_states": xt.to(device, dtype), "timestep": t.to(device),
                    "encoder_hidden_states": emb.to(device, dtype)})
    return out


def _vae_encoder(root: Path, params: Params, workspace: Path, device: torch.device, variant: Variant) -> Encode | None:
    """On-the-fly encoding for datasets with cache_latents: false (None when all are cached)."""
    if all(d.cache_latents for d in params.datasets.values()):
        return None
    from wanlora.models.latents import encode_sample
    from wanlora.models.loading import load_vae

    vae = load_vae(root, torch.float32, str(device))
    return lambda record: encode_sample(vae, record, workspace, params.train.latent_mode, variant,
                                        params.train.last_frame)


def lora_metadata(tr: Trainer, expert: Expert) -> dict[str, str]:
    """LoRA header: lineage (`wanlora.export.lineage`: the samples this run trains and why the
    others are left out), the effective timestep law of the expert and AI Toolkit's
    ss_base_model_version. Deterministic (no clock), so a resumed run writes the same bytes."""
    from wanlora.export.lineage import lineage_metadata

    skipped = {p.path: p.reason for p in tr.data.problems} | dict.fromkeys(tr.data.held_out, HELD_OUT_REASON)
    meta = lineage_metadata(tr.params, tr.workspace, tr.step, expert, tr.base_identity[expert],
                            trained=[it.id for it in tr.data.items], skipped=skipped,
                            sidecar_dir=tr.state_dir / "lora" / expert, variant=tr.variant.name)
    meta["wanlora.timesteps"] = json.dumps(tr.dists[expert].describe(), sort_keys=True)
    meta.update(base_model_version(tr.variant.name))
    return meta


def epoch_order(tr: Trainer, epoch: int) -> list[list[int]]:
    """The batches (item indices) of one epoch, cached for the current epoch."""
    if tr._batches is None or tr._batches[0] != epoch:
        tr._batches = (epoch, epoch_batches(tr.data.buckets(), tr.params.train.batch_size, tr.params.job.seed, epoch))
    return tr._batches[1]


def next_batches(tr: Trainer, experts: list[Expert]) -> list[tuple[Expert, list[GlobalBatch], int]]:
    """This rank's micro-batches of the next optimizer step, given the step's expert per global
    micro-batch (`ExpertSchedule.take`): the group takes the next len(experts) batches of the
    global order, rank r every group-size-th from r. Returned per expert, in order of first
    appearance, with that expert's global micro-batch count; advances the global (epoch, position).
    The ranks of one sequence-parallel replica take the same share."""
    cursor = Cursor(tr.epoch, tr.position)
    batches = take_batches(lambda epoch: epoch_order(tr, epoch), cursor, len(experts))
    tr.epoch, tr.position = cursor.epoch, cursor.position
    rank, n = tr.plan.replica(tr.env.rank, experts[0])
    mine = list(zip(rank_share(batches, rank, n), shard(experts, rank, n)))
    return [(e, [b for b, x in mine if x == e], experts.count(e)) for e in dict.fromkeys(experts)]


def make_batch(tr: Trainer, indices: list[int], expert: Expert, g: torch.Generator) -> StepBatch:
    """Draw everything random for one micro-batch from its own generator (keyed by the batch's
    global position, see `wanlora.train.distributed`), in a fixed order."""
    cfg = tr.params.train
    pairs = [tr.data.inputs(i, g) for i in indices]
    latents = torch.stack([x for x, _ in pairs])
    condition = None if pairs[0][1] is None else torch.stack([c for _, c in pairs]).to(tr.device)
    t = tr.dists[expert].sample(len(indices), g)
    noise = torch.randn(latents.shape, generator=g)
    dropped = (torch.rand(len(indices), generator=g) < cfg.caption_dropout).tolist()
    items = [tr.data.items[i] for i in indices]
    text = tr.workspace / TEXT_DIR

    def embeds(texts: list[str]) -> torch.Tensor:
        return pad_embeds([load_text_embeds(text, s, tr.expect_encoder) for s in texts])

    drop, drop_class = dropout_texts(tr.params.job.trigger_word, cfg.dop.preservation_class)
    captions = [drop if d else it.caption for it, d in zip(items, dropped)]
    class_embeds = None
    if cfg.dop.enabled:
        class_embeds = embeds([drop_class if d else it.caption_dop if it.caption_dop is not None else it.caption
                               for it, d in zip(items, dropped)])
    clean_first = None
    if tr.variant.expand_timesteps:  # drawn last, and only here: A14B batches keep their random stream
        share = torch.tensor([ti2v.i2v_share(tr.params.datasets[it.record["dataset"]]) for it in items])
        clean_first = (torch.rand(len(indices), generator=g) < share) & (latents.shape[2] > 1)  # images: T2I
    dev = tr.device
    return StepBatch(latents.to(dev), noise.to(dev), t.to(dev), embeds(captions).to(dev),
                     None if class_embeds is None else class_embeds.to(dev),
                     None if (w := tr.dists[expert].loss_weights(t)) is None else w.to(dev), condition,
                     None if clean_first is None else clean_first.to(dev))


# ---------------------------------------------------------------------------- lifecycle
def setup(params: Params, workspace: Path, env: DistEnv | None = None) -> Trainer:
    """Everything one rank trains with, in named parts: the model folder and its variant, the
    parallel plan, the data, the timestep laws, this rank's experts (of the active ones) with their
    LoRAs and placement, the optimizers. Each part refuses what it cannot run before the next one
    spends minutes loading weights."""
    from wanlora.models.loading import EXPERT_FOLDERS, model_identity, resolve_model

    workspace = Path(workspace)
    root = resolve_model(params.model.name_or_path, params.model.revision)
    variant = resolve_variant(params.model.variant, root)  # before minutes of loading the wrong model
    check_last_frame(params.train.last_frame, variant)
    check_optimizer(params.train)  # bitsandbytes before minutes of quantizing
    ti2v.check_params(params, variant)
    active = variant.experts if len(variant.experts) == 1 else params.multistage.experts  # TI2V 5B: one, always
    env = env if env is not None else init_distributed(params.job.device)  # cuda:N, never a bare "cuda"
    plan, groups, sequence = _parallel_plan(params, env, active)
    mine = plan.experts_of(env.rank)
    data = _load_data(params, workspace, root, env, variant, mine)
    dists, high_mass = _timestep_laws(params, root, variant, active)
    expect_encoder = encoder_identity(root)
    base_identity = {e: model_identity(root, EXPERT_FOLDERS[e]) for e in active}
    experts, placer, offloads = _load_experts(params, workspace, root, env, mine, data, dists, expect_encoder,
                                              groups, sequence)
    optimizers, emas = _optimizers(params, experts)
    key = run_key(params, workspace, {**base_identity, **_adapter(params)})
    tr = Trainer(
        params=params, workspace=workspace, device=env.device, dtype=DTYPES[params.model.dtype], data=data,
        experts=experts, optimizers=optimizers, emas=emas, dists=dists,
        schedule=ExpertSchedule(mine, params.multistage.switch_every, params.multistage.expert_choice, high_mass),
        placer=placer, offloads=offloads, state_dir=workspace / "scratch/train" / key, base_identity=base_identity,
        expect_encoder=expect_encoder, variant=variant, env=env, plan=plan, groups=groups,
    )
    _check_shapes(tr)
    return tr


def _parallel_plan(params: Params, env: DistEnv, active: tuple[Expert, ...]) -> tuple[ParallelPlan, dict, object]:
    """Which ranks train which expert (`plan_parallel`), the experts' process groups and this rank's
    sequence-parallel group; refuses what the plan cannot run before anything loads."""
    sp = params.train.sequence_parallel
    check_world(env.world, sp)
    plan = plan_parallel(env.world, active, params.train.parallel, sp)
    if params.train.steps % plan.step_increment:  # a round steps both experts: 13 would end at 14
        raise DistributedError(
            f"train.steps is {params.train.steps}, but expert-parallel training steps both experts in each "
            f"round ({plan.step_increment} steps a round). Fix: set train.steps to a multiple of "
            f"{plan.step_increment}, or train.parallel: data")
    groups = make_groups(plan, env)
    sequence = make_sequence_group(env, sp)
    mine = plan.experts_of(env.rank)
    if params.train.sharded_base and len(mine) > 1:
        raise DistributedError("train.sharded_base shards one expert per rank group, but this rank holds both: "
                               "launch an even number of processes with train.parallel: auto or expert")
    if params.quantization.transformer == "qfloat8" and len(mine) > 1 and env.device.type != "cpu":
        from wanlora.models.accel import QFLOAT8_MOVES

        raise UserError(QFLOAT8_MOVES)  # before minutes of loading and quantizing: placing them would fail
    return plan, groups, sequence


def _load_data(params: Params, workspace: Path, root: Path, env: DistEnv, variant: Variant,
               mine: tuple[Expert, ...]) -> TrainData:
    """The cached (or on-the-fly encoded) samples; rank 0 reports the ones left out."""
    from wanlora.models.loading import model_identity

    vae_config = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8"))
    data = build_dataset(workspace, vae_config=vae_config, expect_vae=model_identity(root, "vae"),
                         cached_datasets={n for n, d in params.datasets.items() if d.cache_latents},
                         folders={n: d.folder for n, d in params.datasets.items()},
                         encode=_vae_encoder(root, params, workspace, env.device, variant), variant=variant,
                         last_frame=params.train.last_frame)
    check_model_degree(params.train.sequence_parallel, root, mine, data.buckets(), vae_config)
    problems = data.problems + small_buckets(data.buckets(), params.train.batch_size)
    if env.is_main:
        for p in problems:
            console.print(f"[yellow]train:[/] {p.line()}")
        write_problems(workspace / TRAIN_LIVE / "data_problems.json", problems)
    return data


def _timestep_laws(params: Params, root: Path, variant: Variant,
                   active: tuple[Expert, ...]) -> tuple[dict[Expert, TimestepDistribution], float]:
    """Each active expert's timestep law on its band of the boundary, and the high-noise band's
    probability mass (what the `proportional` schedule picks it with; 1 for one transformer)."""
    from wanlora.models.loading import boundary_ratio

    ms, cfg = params.multistage, params.train
    boundary = None if variant.boundary is None else (
        ms.boundary_ratio if ms.boundary_ratio is not None else boundary_ratio(root))

    def law(e: Expert) -> TimestepDistribution:
        return TimestepDistribution(cfg.timestep_type, cfg.timestep_bias, expert_band(e, boundary),
                                    params.model.flow_shift)

    return {e: law(e) for e in active}, 1.0 if boundary is None else law("high").band_mass()


def _load_experts(params: Params, workspace: Path, root: Path, env: DistEnv, mine: tuple[Expert, ...],
                  data: TrainData, dists: dict[Expert, TimestepDistribution], expect_encoder: str,
                  groups: dict[Expert, object], sequence: object,
                  ) -> tuple[dict[Expert, torch.nn.Module], ExpertPlacer, list[BlockOffload]]:
    """This rank's experts with their LoRAs, and the placer that keeps the first one on the device."""
    device, dtype = env.device, DTYPES[params.model.dtype]
    experts, offloads, where = {}, [], {}
    for e in mine:
        calib = _calibration_inputs(data, dists[e], workspace, params, expect_encoder, device, dtype)
        # The first expert loads onto the device, the other waits in host memory, unless its 4-bit
        # recovery is fitted: calibration runs the expert's forward on inputs on the device (an
        # A14B forward on the CPU is far too slow), so it loads there, once the experts already
        # loaded are parked if they cannot all stay (`park_loaded`); the placer then fetches the first.
        where[e] = "device" if e == mine[0] or device.type == "cpu" or calib is not None else "host"
        if where[e] == "device" and experts and device.type == "cuda":
            park_loaded(experts, where, both_fit(params, experts, device),
                        make_mover(device, {id(b) for off in offloads for b in off.blocks}))
        experts[e], off = _load_expert(root, e, params, workspace, device, dtype,
                                       device if where[e] == "device" else torch.device("cpu"), calib)
        enable_sequence_parallel(experts[e], sequence)
        if params.train.sharded_base:
            from wanlora.train.dist_fsdp import shard_base

            shard_base(experts[e], env, groups[e], offloading=params.model.layer_offloading)
        offloads += off
    mover = make_mover(device, {id(b) for off in offloads for b in off.blocks})
    placer = ExpertPlacer(experts, device, both_fit(params, experts, device), mover, where)
    placer.prepare(mine[0])
    return experts, placer, offloads


def _optimizers(params: Params, experts: dict[Expert, torch.nn.Module],
                ) -> tuple[dict[Expert, torch.optim.Optimizer], dict[Expert, Ema]]:
    """Each expert's optimizer over its LoRA parameters, and its EMA when `train.ema` is on."""
    cfg = params.train
    optimizers = {e: build_optimizer([p for p in m.parameters() if p.requires_grad], cfg) for e, m in experts.items()}
    return optimizers, {e: Ema(m, cfg.ema.decay) for e, m in experts.items()} if cfg.ema.enabled else {}


def _check_shapes(tr: Trainer) -> None:
    """A cache made for another model shows up as a width mismatch: say so before the first step."""
    item = tr.data.items[0]
    emb = load_text_embeds(tr.workspace / TEXT_DIR, item.caption, tr.expect_encoder)
    for e, m in tr.experts.items():
        if emb.shape[-1] != m.config.text_dim:
            raise InputError(f"{tr.workspace / TEXT_DIR}: embeddings are {emb.shape[-1]} wide but the {e}-noise "
                             f"expert expects {m.config.text_dim}. {rebuild_fix('text_cache')}")
        if tr.data.channels() + tr.variant.condition_channels != m.config.in_channels:
            raise InputError(f"the VAE has {tr.data.channels()} latent channels (+{tr.variant.condition_channels} "
                             f"condition channels for {tr.variant.name}) but the {e}-noise expert takes "
                             f"{m.config.in_channels}. Fix: use one model folder for both")


def step_experts(tr: Trainer, parts: list[tuple[Expert, list[GlobalBatch], int]]) -> dict[Expert, StepOutcome]:
    """One optimizer step of each expert of `parts` (`next_batches`), in turn, each on its own
    micro-batches and optimizer. Once an expert has stepped, the weights of the one that trains
    next (later in this step, or at the next turn: `ExpertSchedule.upcoming`) start their copy to
    the device, and its EMA follows a finite update."""
    outs: dict[Expert, StepOutcome] = {}
    for k, (expert, mine, count) in enumerate(parts):
        model = tr.placer.activate(expert) if mine else tr.experts[expert]  # no batch here: no need to fetch it
        out = outs[expert] = optimizer_step(
            model, tr.optimizers[expert], mine, lambda idx, e, g: make_batch(tr, idx, e, g), expert=expert,
            step=tr.step, cfg=tr.params.train, seed=tr.params.job.seed, dtype=tr.dtype, env=tr.env,
            group=tr.groups[expert], micro_batches=count, sp=tr.plan.sp)
        following = parts[k + 1][0] if k + 1 < len(parts) else tr.schedule.upcoming()
        if following is not None:
            tr.placer.prepare(following)
        if out.finite and expert in tr.emas:
            tr.emas[expert].update(model)
        for off in tr.offloads:  # an offloaded block left on the device goes home before the next expert runs
            off.release()
    return outs


def _monitor(tr: Trainer) -> Monitor:
    return Monitor(tr.workspace / TRAIN_LIVE, tr.workspace / TRAIN_PERF, tr.state_dir / "live",
                   tr.params.train.steps, tr.step, tr.history)


def train(tr: Trainer) -> None:
    """Run optimizer steps until `train.steps`, saving every `save.every` and at the end.

    The same loop runs on one process and under torchrun: `optimizer_step` averages the LoRA
    gradients over the expert's rank group (a no-op alone), and every random draw is keyed by the
    batch's global position (`wanlora.train.distributed`), so N ranks equal one with N x accumulation.
    In expert-parallel mode both experts step in each round and the global step advances by two.
    """
    cfg = tr.params.train
    plan, env = tr.plan, tr.env
    monitor = _monitor(tr) if env.is_main else None
    preview = make_previewer(tr) if env.is_main else None
    if preview is not None:
        publish_previews(preview, tr.history)  # a resumed run shows what it rendered before the kill
    try:
        while tr.step < cfg.steps:
            started = time.perf_counter()
            choice = torch.Generator().manual_seed(derive_seed(tr.params.job.seed, "expert", tr.step))
            members = plan.groups[tr.schedule.active[0]]  # this rank's group, whichever expert it trains
            replicas = len(members) // plan.sp  # sequence-parallel ranks share their micro-batches
            parts = next_batches(tr, tr.schedule.take(cfg.gradient_accumulation * replicas, choice))
            outs = step_experts(tr, parts)
            tr.bad_steps = 0 if all(o.finite for o in outs.values()) else tr.bad_steps + 1
            if tr.bad_steps and env.rank == members[0]:
                bad = " and ".join(f"{e}-noise" for e, o in outs.items() if not o.finite)
                console.print(f"[red]train: step {tr.step + 1}: loss is not finite on the {bad} expert; "
                              f"skipped ({tr.bad_steps} in a row)[/]")
            seconds = time.perf_counter() - started
            metrics = {e: {"loss": o.main, **({"dop": o.preservation} if cfg.dop.enabled else {})} for e, o in outs.items()}
            samples = sum(len(b.indices) for _, mine, _ in parts for b in mine)
            logged, samples_per_s, stop = world_metrics(plan, metrics, samples, seconds, env,
                                                        stop=tr.bad_steps >= cfg.max_bad_steps)
            if stop:
                raise BadLossError(
                    f"{tr.bad_steps} non-finite losses in a row (train.max_bad_steps={cfg.max_bad_steps}). "
                    "Fix: lower train.lr, keep train.max_grad_norm > 0, or use model.dtype bf16 instead of fp16"
                )
            previous, tr.step = tr.step, tr.step + plan.step_increment
            row = {"step": float(tr.step), **logged, "lr": next(iter(outs.values())).lr,
                   "grad_norm": math.hypot(*(o.grad_norm for o in outs.values())),  # of every LoRA that stepped
                   "step_time": seconds, "samples_per_s": samples_per_s,
                   "peak_mem": peak_memory_gib(tr.device)}
            tr.history.append(row)
            if monitor is not None:
                monitor.log(row)
            if preview is not None and preview_due(tr.params, previous, tr.step):
                render_preview(tr, preview)  # before the save: a kill in it redoes the steps and the preview
            every = tr.params.save.every
            if tr.step // every > previous // every or tr.step >= cfg.steps:
                save_checkpoint(tr)
    finally:
        if monitor is not None:
            monitor.close()


def _parts(tr: Trainer) -> dict[Expert, ExpertParts]:
    return {e: ExpertParts(m, tr.optimizers[e], tr.emas.get(e)) for e, m in tr.experts.items()}


def save_checkpoint(tr: Trainer) -> None:
    """The LoRA pair for this step and the rank-independent training state (see
    `wanlora.train.dist_checkpoint`); collective, rank 0 writes."""
    def files(tensors: dict[Expert, dict[str, torch.Tensor]]) -> dict[Expert, bytes]:
        return {e: lora_file_bytes(t, DTYPES[tr.params.save.dtype], tr.params.network, lora_metadata(tr, e))
                for e, t in tensors.items()}

    save_parallel_checkpoint(tr.state_dir, tr.env, tr.plan, _parts(tr), step=tr.step,
                             cursor=Cursor(tr.epoch, tr.position), lora_files=files,
                             keep_last=tr.params.save.keep_last,
                             extra={"bad_steps": tr.bad_steps, "schedule": tr.schedule.state_dict(),
                                    "history": tr.history})
    if tr.env.is_main:
        ckpt.publish_loras(tr.state_dir, tr.workspace / LORA)


def load_checkpoint(tr: Trainer) -> bool:
    """Continue from this run's last state, written by any number of ranks; True when one was loaded."""
    plain = load_parallel_checkpoint(tr.state_dir, tr.env, _parts(tr))
    if plain is None:
        return False
    tr.schedule.load_state_dict(plain["schedule"])
    tr.step, tr.epoch, tr.position = int(plain["step"]), int(plain["epoch"]), int(plain["position"])
    tr.bad_steps, tr.history = int(plain["bad_steps"]), list(plain["history"])
    if tr.env.is_main:
        console.print(f"train: resuming at step {tr.step} from {tr.state_dir}")
    return True


def run_stage(params: Params, workspace: Path) -> None:
    """DVC stage `train`: reads the manifests and caches under `workspace`, writes data/lora and
    data/train_live, resuming from scratch/train/<key>/ when a previous run was interrupted."""
    with distributed(params.job.device) as env:  # one process: a plain environment, no group
        tr = setup(params, Path(workspace), env)
        load_checkpoint(tr)
        if tr.step < params.train.steps:
            train(tr)
        elif env.is_main:
            ckpt.publish_loras(tr.state_dir, tr.workspace / LORA)
            _monitor(tr).close()
            if (preview := make_previewer(tr)) is not None:
                publish_previews(preview, tr.history)
