"""The pieces of the trainer on their own: step math, DOP, schedule, placement, offload, state."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load as st_load

from wanlora.config import NetworkConfig, TrainConfig
from wanlora.data.dataset import epoch_batches, small_buckets
from wanlora.models.geometry import TINY, build_transformer
from wanlora.train import checkpoint as ckpt
from wanlora.train.experts import ExpertPlacer, ExpertSchedule, park_loaded, plan_placement
from wanlora.tensorfiles import to_bytes as safetensors_bytes
from wanlora.train.lora import Ema, add_lora, lora_disabled, lora_state_dict
from wanlora.train.offload import BlockOffload
from wanlora.train.optim import build_optimizer, lr_at
from wanlora.train.step import StepBatch, training_step

NET = NetworkConfig(rank=4, alpha=8)


def _expert(seed: int = 0) -> torch.nn.Module:
    model = build_transformer(TINY, torch.float32, "cpu", seed)
    torch.manual_seed(seed + 100)
    add_lora(model, NET)
    with torch.no_grad():  # a LoRA that already moved away from zero, so it changes outputs
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.train()


def _batch(n: int = 2, seed: int = 0, dop: bool = False) -> StepBatch:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 16, 2, 4, 4)
    return StepBatch(torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                     torch.rand(n, generator=g) * 1000, torch.randn(n, 12, 32, generator=g),
                     torch.randn(n, 12, 32, generator=g) if dop else None)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _sub(b: StepBatch, i: int) -> StepBatch:
    pick = lambda t: None if t is None else t[i:i + 1]  # noqa: E731
    return StepBatch(*(pick(getattr(b, f)) for f in ("latents", "noise", "timesteps", "embeds", "class_embeds", "weights")))


# ------------------------------------------------------------------------------ the step
def test_accumulating_two_micro_batches_equals_one_batch_of_two():
    model, batch = _expert(), _batch(2)
    training_step(model, batch, dtype=torch.float32)
    whole = _grads(model)
    model.zero_grad()
    for i in range(2):
        training_step(model, _sub(batch, i), dtype=torch.float32, loss_scale=0.5)
    acc = _grads(model)
    assert len(whole) == 40 and whole.keys() == acc.keys()
    for k in whole:
        assert torch.allclose(whole[k], acc[k], rtol=1e-4, atol=1e-7), k


def test_dop_batched_equals_separate_passes_and_matches_formula():
    model, batch = _expert(), _batch(2, dop=True)
    a = training_step(model, batch, dtype=torch.float32, dop_multiplier=0.7, batch_dop=True)
    ga = _grads(model)
    model.zero_grad()
    b = training_step(model, batch, dtype=torch.float32, dop_multiplier=0.7, batch_dop=False)
    gb = _grads(model)
    assert a.main == pytest.approx(b.main, rel=1e-5) and a.preservation == pytest.approx(b.preservation, rel=1e-5)
    assert all(torch.allclose(ga[k], gb[k], rtol=1e-4, atol=1e-7) for k in ga)
    # preservation = multiplier * MSE(LoRA on class prompt, base on class prompt), same x_t and t
    from wanlora.train import flowmatch as fm

    with torch.no_grad():
        xt = fm.add_noise(batch.latents, batch.noise, batch.timesteps)
        on = model(hidden_states=xt, timestep=batch.timesteps, encoder_hidden_states=batch.class_embeds).sample
        with lora_disabled(model):
            off = model(hidden_states=xt, timestep=batch.timesteps, encoder_hidden_states=batch.class_embeds).sample
    assert a.preservation == pytest.approx(0.7 * float((on - off).pow(2).mean()), rel=1e-5)
    assert a.total == pytest.approx(a.main + a.preservation, rel=1e-6)


def test_differential_guidance_scales_the_gradient():
    model, batch = _expert(), _batch(2)
    plain = training_step(model, batch, dtype=torch.float32)
    g1 = _grads(model)
    model.zero_grad()
    guided = training_step(model, batch, dtype=torch.float32, guidance_scale=3.0)
    g3 = _grads(model)
    assert guided.main == pytest.approx(9 * plain.main, rel=1e-5)  # (scale * residual)^2
    assert all(torch.allclose(g3[k], 3 * g1[k], rtol=1e-4, atol=1e-7) for k in g1)


def test_non_finite_loss_touches_nothing():
    model, batch = _expert(), _batch(1)
    batch.latents[0, 0, 0, 0, 0] = float("inf")
    out = training_step(model, batch, dtype=torch.float32)
    assert not out.finite and _grads(model) == {}


def test_lora_at_scale_zero_is_the_base_model():
    base = build_transformer(TINY, torch.float32, "cpu", 0)
    model, batch = _expert(0), _batch(1)
    x = dict(hidden_states=batch.latents, timestep=batch.timesteps, encoder_hidden_states=batch.embeds)
    with torch.no_grad():
        want = base(**x).sample
        assert not torch.allclose(model(**x).sample, want, atol=1e-4)  # the LoRA does change outputs
        with lora_disabled(model):
            assert torch.equal(model(**x).sample, want)


def test_dop_from_cached_embeddings_equals_live_encoding(tmp_path):
    """The class prompt read back from the text cache conditions the expert exactly as the
    prompt encoded live by UMT5 (same preservation loss, same gradients)."""
    from wanlora.io import write_jsonl
    from wanlora.models.loading import load_text_encoder, load_tokenizer
    from wanlora.models.text import encode_text, encoder_identity, load_text_embeds, pad_embeds
    from wanlora.models.text import run_stage as text_cache
    from wanlora.models.tiny import make_tiny

    root = make_tiny(tmp_path / "model")
    cap = {"id": "a", "caption": "sks dancing in the rain", "caption_dop": "person dancing in the rain"}
    write_jsonl(tmp_path / "captions.jsonl", [cap])
    text_cache(root=root, captions_manifest=tmp_path / "captions.jsonl", prompts=[], trigger="sks",
               dropout=("sks", "person"), out_dir=tmp_path / "text", dtype="fp32", quant="none", device="cpu")
    enc, tok = load_text_encoder(root, "fp32"), load_tokenizer(root)
    live = pad_embeds([encode_text(tok, enc, cap["caption_dop"])])
    cached = pad_embeds([load_text_embeds(tmp_path / "text", cap["caption_dop"], encoder_identity(root))])
    trig = pad_embeds([load_text_embeds(tmp_path / "text", cap["caption"])])
    model, b = _expert(), _batch(1)
    runs = []
    for cls in (cached, live):
        model.zero_grad()
        out = training_step(model, StepBatch(b.latents, b.noise, b.timesteps, trig, cls), dtype=torch.float32,
                            dop_multiplier=1.0)
        runs.append((out, _grads(model)))
    assert runs[0][0].preservation == runs[1][0].preservation and runs[0][0].preservation > 0
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


# -------------------------------------------------------------------------- the schedule
def test_switch_every_alternates_in_blocks_and_resumes():
    g = torch.Generator().manual_seed(0)
    s = ExpertSchedule(("low", "high"), switch_every=3)
    seen = []
    for _ in range(8):
        seen.append(s.next_expert(g))
        s.record(1)
    assert "".join(e[0] for e in seen) == "hhhlllhh"  # high first whatever the order given
    state = s.state_dict()
    t = ExpertSchedule(("high", "low"), switch_every=3)
    t.load_state_dict(state)
    assert [t.next_expert(g)] == ["high"] and s.upcoming() is None
    s.record(1)
    assert s.upcoming() == "low"  # the turn is complete: prefetch the next expert now


def test_switch_every_counts_micro_batches_as_ai_toolkit_does():
    """AI Toolkit checks `steps_this_boundary >= switch_boundary_every` before every micro-batch
    of an accumulation window and counts each one (extensions_built_in/sd_trainer/SDTrainer.py,
    `hook_train_loop`), so a turn can end inside an optimizer step; its docs (ui/src/docs.tsx,
    'train.switch_boundary_every') advise switch every 1 with accumulation 2 "to train both
    stages in a single step". `take` gives the expert of each micro-batch of one step."""
    g = torch.Generator().manual_seed(0)
    both = ExpertSchedule(("high", "low"), switch_every=1)
    assert [both.take(2, g) for _ in range(3)] == [["high", "low"]] * 3
    three = ExpertSchedule(("high", "low"), switch_every=3)
    steps = [three.take(2, g) for _ in range(2)]
    state = three.state_dict()  # a checkpoint at this step boundary, mid-turn
    steps += [three.take(2, g) for _ in range(2)]
    assert steps == [["high", "high"], ["high", "low"], ["low", "low"], ["high", "high"]]
    resumed = ExpertSchedule(("high", "low"), switch_every=3)
    resumed.load_state_dict(state)
    assert [resumed.take(2, g) for _ in range(2)] == steps[2:]
    assert ExpertSchedule(("low",), 2).take(3, g) == ["low"] * 3
    proportional = ExpertSchedule(("high", "low"), 1, "proportional", high_probability=0.5)
    assert all(len(set(proportional.take(4, g))) == 1 for _ in range(20))  # one expert per optimizer step


def test_proportional_choice_follows_band_mass_and_single_expert():
    g = torch.Generator().manual_seed(1)
    s = ExpertSchedule(("high", "low"), 1, "proportional", high_probability=0.2)
    picks = [s.next_expert(g) for _ in range(4000)]
    assert picks.count("high") / 4000 == pytest.approx(0.2, abs=0.02)
    only = ExpertSchedule(("low",), 1)
    assert {only.next_expert(g) for _ in range(5)} == {"low"}
    with pytest.raises(ValueError, match="no expert selected"):
        ExpertSchedule((), 1)


def test_placement_plan():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert plan_placement("high", ("high", "low"), cpu, both_fit=False) == {"high": "device", "low": "device"}
    assert plan_placement("high", ("high", "low"), gpu, both_fit=True) == {"high": "device", "low": "device"}
    assert plan_placement("low", ("high", "low"), gpu, both_fit=False) == {"high": "host", "low": "device"}
    assert plan_placement("high", ("high",), gpu, both_fit=False) == {"high": "device"}


def test_placer_moves_outgoing_expert_out_before_bringing_the_next_in():
    moves = []
    models = {"high": torch.nn.Linear(1, 1), "low": torch.nn.Linear(1, 1)}
    placer = ExpertPlacer(models, torch.device("meta"), fit=False,
                          mover=lambda m, where, nb: moves.append(("high" if m is models["high"] else "low", where)),
                          where={"high": "device", "low": "host"})
    assert placer.activate("high") is models["high"] and moves == []
    placer.prepare("low")  # the prefetch at the end of a turn
    assert moves == [("high", "host"), ("low", "device")]
    placer.activate("low")
    assert moves == [("high", "host"), ("low", "device")]  # already there: nothing moves twice
    both = ExpertPlacer(models, torch.device("meta"), fit=True, mover=lambda *a: moves.append(a),
                        where={"high": "device", "low": "host"})
    moves.clear()
    both.activate("high")
    assert [(w) for _, w, _ in moves] == ["device"]  # both fit: the waiting expert joins, none leaves


def test_an_expert_already_loaded_is_parked_before_the_next_loads_onto_the_device():
    """Fitted 4-bit recovery loads both experts onto the GPU in turn; on the 24 GB tier the first
    stayed there while the second was fitted, 24.8 GiB on the card (bench/RESULTS.md, second H200
    session). Unless both fit, the loaded ones go to host memory first; the placer fetches back
    the one that trains first."""
    moves = []
    models = {"high": torch.nn.Linear(1, 1)}
    where = {"high": "device"}
    mover = lambda m, w, nb: moves.append((m, w, nb))  # noqa: E731
    park_loaded(models, where, fit=False, mover=mover)
    assert moves == [(models["high"], "host", False)] and where == {"high": "host"}
    park_loaded(models, where, fit=False, mover=mover)
    assert len(moves) == 1  # already parked: nothing moves twice
    where["high"] = "device"
    park_loaded(models, where, fit=True, mover=mover)
    assert len(moves) == 1 and where == {"high": "device"}  # both fit: it stays
    models["low"], where["low"] = torch.nn.Linear(1, 1), "device"
    placer = ExpertPlacer(models, torch.device("meta"), fit=False, mover=mover, where=dict(where, high="host"))
    placer.prepare("high")  # what setup does next: the first expert comes back, the fitted one leaves
    assert [(w) for _, w, _ in moves[1:]] == ["host", "device"]


def test_block_offload_visits_the_device_only_around_each_block():
    events: list[tuple[int, str]] = []
    model, ref, batch = _expert(), _expert(), _batch(1)
    ids = {id(b): i for i, b in enumerate(model.blocks)}
    off = BlockOffload(model, torch.device("cpu"), 1.0, mover=lambda m, w: events.append((ids[id(m)], w)))
    assert events == [(0, "host"), (1, "host")]
    events.clear()
    out = training_step(model, batch, dtype=torch.float32)
    want = training_step(ref, batch, dtype=torch.float32)
    assert out.total == pytest.approx(want.total, rel=1e-6)
    g, gr = _grads(model), _grads(ref)
    assert all(torch.allclose(g[k], gr[k], rtol=1e-5, atol=1e-8) for k in gr)
    # forward: each block in and out; backward recomputes block 1 then block 0
    assert events[:4] == [(0, "device"), (0, "host"), (1, "device"), (1, "host")]
    assert events[4:] == [(1, "device"), (1, "host"), (0, "device")]
    off.release()
    assert events[-1] == (0, "host") and off.on_device == set()


# ------------------------------------------------------------------- optimizer and state
@pytest.mark.parametrize("name", ["adamw", "adafactor", "adamw8bit"])
def test_optimizer_state_round_trips_through_safetensors_and_json(name, tmp_path):
    cfg = TrainConfig(optimizer=name, lr=1e-2)
    torch.manual_seed(0)
    a = torch.nn.Linear(80, 64)
    b = torch.nn.Linear(80, 64)
    b.load_state_dict(a.state_dict())
    oa, ob = build_optimizer(list(a.parameters()), cfg), build_optimizer(list(b.parameters()), cfg)
    x = torch.randn(4, 80)
    for _ in range(2):
        a(x).pow(2).mean().backward()
        oa.step()
        oa.zero_grad()
    tensors, plain = ckpt.flatten_optimizer(oa, "optim.high")
    ckpt.save_state(tmp_path, 2, tensors, {"optim": plain})
    t2, p2 = ckpt.load_state(tmp_path)
    b.load_state_dict(a.state_dict())
    ckpt.restore_optimizer(ob, t2, p2["optim"])
    for m, o in ((a, oa), (b, ob)):
        m(x).pow(2).mean().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, steps=10, warmup_steps=2, lr_scheduler="cosine")
    assert [round(lr_at(s, cfg), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    lin = TrainConfig(lr=1.0, steps=10, lr_scheduler="linear")
    assert [lr_at(s, lin) for s in (0, 5)] == [1.0, 0.5]
    assert lr_at(7, TrainConfig(lr=0.3)) == 0.3


def test_ema_and_canonical_file_bytes():
    model = _expert()
    ema = Ema(model, decay=0.5)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    ema.update(model)
    now = lora_state_dict(model)
    assert all(torch.allclose(ema.shadow[k], 0.5 * before[k] + 0.5 * now[k]) for k in now)
    tensors, meta = {"b": torch.ones(3), "a": torch.zeros(2)}, {f"k{i}": str(i) for i in range(20)}
    canon = safetensors_bytes(tensors, meta)
    assert all(safetensors_bytes(tensors, meta) == canon for _ in range(5)) and len(canon[:8]) == 8
    assert {k: v.tolist() for k, v in st_load(canon).items()} == {"a": [0.0, 0.0], "b": [1.0, 1.0, 1.0]}
    header = canon[8:8 + int.from_bytes(canon[:8], "little")]
    assert header.index(b'"k0"') < header.index(b'"k1"') < header.index(b'"k2"') and len(header) % 8 == 0


def test_a_loaded_ema_state_stays_on_the_shadows_device():
    """A resumed run reads the EMA from the checkpoint on the CPU; the shadows must stay on the
    LoRA's device (found by review of the GPU path: after a resume each update copied the LoRA to
    the CPU). The meta device stands in for the GPU."""
    ema = Ema(_expert(), decay=0.5)
    saved = {k: v + 1 for k, v in ema.state_dict().items()}
    ema.shadow = {k: v.to("meta") for k, v in ema.shadow.items()}
    ema.load_state_dict(saved)
    assert {v.device.type for v in ema.shadow.values()} == {"meta"}
    assert all(ema.shadow[k].dtype == torch.float32 and ema.shadow[k].shape == v.shape for k, v in saved.items())


# ------------------------------------------------------------------------------ data order
def test_epoch_batches_never_mix_buckets_and_are_seeded():
    buckets = ["A"] * 5 + ["B"] * 3 + ["C"]
    e0 = epoch_batches(buckets, 2, seed=4, epoch=0)
    assert sorted(i for b in e0 for i in b) == list(range(9))
    assert all(len({buckets[i] for i in b}) == 1 for b in e0)
    assert sorted(len(b) for b in e0) == [1, 1, 1, 2, 2, 2]
    assert e0 == epoch_batches(buckets, 2, seed=4, epoch=0) != epoch_batches(buckets, 2, seed=4, epoch=1)
    report = small_buckets(buckets, 2)
    assert [p.path for p in report] == ["bucket C"] and "fewer than train.batch_size=2" in report[0].reason


def test_placing_an_expert_leaves_offloaded_blocks_to_the_offloader():
    from wanlora.train.experts import placement_parts

    model = _expert()
    off = BlockOffload(model, torch.device("cpu"), 0.5, mover=lambda m, w: None)
    assert off.blocks == [model.blocks[0]]
    modules, own = placement_parts(model, {id(b) for b in off.blocks})
    assert model.blocks[1] in modules and all(m is not model.blocks[0] for m in modules)
    assert model.proj_out in modules and model.condition_embedder in modules
    assert [t.shape for t in own] == [model.scale_shift_table.shape]
    covered = {id(p) for m in modules for p in m.parameters()} | {id(t) for t in own}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen - covered == {id(p) for p in model.blocks[0].parameters() if not p.requires_grad}
