"""The train stage end to end on the tiny model: overfitting, expert schedule, files, bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _helpers import BUCKET, copy_workspace, make_workspace, tiny_params, write_latents
from wanlora.config import DEFAULT_TARGETS, ParamsError, parse_params
from wanlora.errors import UserError
from wanlora.models.loading import model_identity
from wanlora.report import InputError
from wanlora.train import loop
from wanlora.train import step as step_module
from wanlora.train.distributed import DistEnv
from wanlora.train.lora import lora_state_dict


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("train")
    ws = make_workspace(base / "ws", base / "model")
    return ws, base / "model"


@pytest.fixture
def ws(template, tmp_path) -> Path:
    return copy_workspace(template[0], tmp_path / "ws")


def test_tiny_model_overfits_two_clips(tmp_path):
    """Loss per expert falls by more than half in 300 steps on two clips (5 frames at 32x32);
    measured ratios last/first: ~0.06 (high) and ~0.33 (low; small sigma is the hard part).

    Patch [1, 1, 1] and a LoRA on proj_out let the 32-wide tiny model carry every latent value;
    the latents are constant over space and time so memorising them takes few steps."""
    ws = make_workspace(tmp_path / "ws", tmp_path / "model", patch=[1, 1, 1], scale=1.0, smooth=True)
    params = tiny_params(tmp_path / "model", train={"steps": 300, "lr": 2e-2, "lr_scheduler": "cosine",
                                                    "max_grad_norm": 0},
                         network={"rank": 16, "alpha": 16, "target_modules": [*DEFAULT_TARGETS, "proj_out"]},
                         save={"every": 1000}, multistage={"switch_every": 1})
    tr = loop.setup(params, ws)
    loop.train(tr)
    for expert in ("high", "low"):
        losses = [r[f"loss_{expert}"] for r in tr.history if f"loss_{expert}" in r]
        assert len(losses) == 150
        first, last = statistics.mean(losses[:15]), statistics.mean(losses[-15:])
        assert last < 0.5 * first, f"{expert}: {first:.3f} -> {last:.3f}"
    # memory stays flat (peak RSS on CPU): measured +0.25 MiB over 250 steps; keeping each step's
    # prediction with its graph alive makes it +65 MiB
    growth = tr.history[-1]["peak_mem"] - tr.history[49]["peak_mem"]
    assert growth < 0.02, f"peak memory grew {growth * 1024:.0f} MiB over 250 steps"
    # the run wrote its final pair, with the loop's dvclive metrics beside it
    assert sorted(p.name for p in (ws / "data/lora/high").iterdir()) == ["step_000300.safetensors"]
    metrics = json.loads((ws / "data/train_live/metrics.json").read_text())
    assert metrics["step"] == 300 and metrics["loss_low"] == pytest.approx(tr.history[-1]["loss_low"])


def test_switch_every_in_the_loop_and_files(ws, template):
    params = tiny_params(template[1], train={"steps": 7}, multistage={"switch_every": 2},
                         save={"every": 3, "keep_last": 2, "dtype": "bf16"})
    loop.run_stage(params, ws)
    tr_hist = json.loads(next((ws / "scratch/train").glob("*/state_000007/state.json")).read_text())["history"]
    order = ["high" if "loss_high" in r else "low" for r in tr_hist]
    assert order == ["high", "high", "low", "low", "high", "high", "low"]
    for expert in ("high", "low"):
        names = sorted(p.name for p in (ws / "data/lora" / expert).iterdir())
        assert names == ["step_000006.safetensors", "step_000007.safetensors"]  # keep_last 2 of 3, 6, 7
        path = ws / "data/lora" / expert / names[-1]
        tensors = load_file(path)
        assert all(k.startswith("transformer.blocks.") and ".lora_" in k for k in tensors)
        assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
        assert len(tensors) == 2 * 2 * 10  # 2 blocks x 10 adapted linears x (A, B)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        assert meta["wanlora.expert"] == expert and meta["wanlora.step"] == "7"
        assert json.loads(meta["lora_adapter_metadata"])["transformer.r"] == 4
        assert json.loads(meta["wanlora.timesteps"])["band_lo"] == (875.0 if expert == "high" else 0.0)
        assert meta["wanlora.base_model"].endswith(model_identity(template[1], "transformer" if expert == "high" else "transformer_2"))
    # the high file is not the low file: two LoRAs, never a shared one
    high = load_file(ws / "data/lora/high/step_000007.safetensors")
    low = load_file(ws / "data/lora/low/step_000007.safetensors")
    assert not torch.equal(high["transformer.blocks.0.attn1.to_q.lora_B.weight"],
                           low["transformer.blocks.0.attn1.to_q.lora_B.weight"])


def test_switch_every_counts_micro_batches_in_the_loop(ws, template, monkeypatch):
    """switch_every counts micro-batches, as AI Toolkit does (extensions_built_in/sd_trainer/
    SDTrainer.py, `hook_train_loop`, which may switch experts between the micro-batches of one
    accumulation window): with accumulation 3 and switch_every 1 the steps hold high, low, high
    then low, high, low; every optimizer step updates both experts, each with its own optimizer on
    the mean of its own micro-batches (gradient scale 1/2 or 1), and logs both losses."""
    seen: list[tuple[int, str, float, float]] = []
    real = step_module.training_step

    def spy(model, batch, **kw):
        out = real(model, batch, **kw)
        seen.append((len(tr.history), next(e for e, m in tr.experts.items() if m is model), kw["loss_scale"], out.main))
        return out

    params = tiny_params(template[1], train={"steps": 2, "gradient_accumulation": 3}, multistage={"switch_every": 1},
                         save={"every": 10})
    tr = loop.setup(params, ws)
    monkeypatch.setattr(step_module, "training_step", spy)
    loop.train(tr)
    order = [[e for s, e, _, _ in seen if s == step] for step in (0, 1)]
    assert sorted(order[0]) == ["high", "high", "low"] and sorted(order[1]) == ["high", "low", "low"]
    for step, row in enumerate(tr.history):
        for e in ("high", "low"):
            mine = [(scale, main) for s, x, scale, main in seen if s == step and x == e]
            assert {scale for scale, _ in mine} == {1 / len(mine)}
            assert row[f"loss_{e}"] == pytest.approx(sum(m for _, m in mine) / len(mine), rel=1e-12)
    assert {e: tr.optimizers[e].state_dict()["state"][0]["step"].item() for e in ("high", "low")} == {"high": 2, "low": 2}


def test_lora_and_exported_files_carry_ai_toolkits_catalogue_keys(ws, template, tmp_path):
    """jobs/process/BaseSDTrainProcess.py update_training_metadata writes ss_base_model_version
    (extensions_built_in/diffusion_models/wan22/wan22_14b_model.py get_base_model_version:
    'wan_2.2_14b') and ss_output_name (the job's name) into every LoRA it saves; LoRA catalogues
    read them. Ours: the version in the trained files, both in the exports (named after the job)."""
    from wanlora.export.stage import run_stage as export
    from wanlora.pipeline import BEST, LORA

    params = tiny_params(template[1], job={"name": "harbour_boats"}, train={"steps": 1}, save={"every": 1},
                         multistage={"switch_every": 1}, export={"step": "last", "formats": ["comfyui"]})
    loop.run_stage(params, ws)
    export(params, ws / LORA, ws / BEST, tmp_path / "exports")
    trained = ws / "data/lora/high/step_000001.safetensors"
    exported = tmp_path / "exports/comfyui/harbour_boats_step000001_high_noise.safetensors"
    for path, want in ((trained, {"ss_base_model_version": "wan_2.2_14b"}),
                       (exported, {"ss_base_model_version": "wan_2.2_14b", "ss_output_name": "harbour_boats"})):
        with safe_open(str(path), framework="pt") as f:
            assert {k: v for k, v in f.metadata().items() if k.startswith("ss_")} == want, path.name


def test_lora_files_load_into_wan_pipeline(ws, template):
    """diffusers reads our files: high into transformer, low into transformer_2, same weights."""
    from diffusers import WanPipeline

    params = tiny_params(template[1], train={"steps": 2}, save={"every": 2}, multistage={"switch_every": 1})
    tr = loop.setup(params, ws)
    loop.train(tr)
    pipe = WanPipeline.from_pretrained(template[1])
    pipe.load_lora_weights(str(ws / "data/lora/high/step_000002.safetensors"), adapter_name="high")
    pipe.load_lora_weights(str(ws / "data/lora/low/step_000002.safetensors"), adapter_name="low",
                           load_into_transformer_2=True)
    key = "blocks.1.ffn.net.2.lora_B"
    ours = dict(tr.experts["low"].named_parameters())[f"{key}.default.weight"]
    theirs = dict(pipe.transformer_2.named_parameters())[f"{key}.low.weight"]
    assert torch.equal(ours.detach(), theirs.detach()) and ours.abs().sum() > 0
    assert pipe.transformer_2.peft_config["low"].lora_alpha == 4


def test_only_one_expert_loads_and_trains(ws, template):
    params = tiny_params(template[1], train={"steps": 3}, multistage={"train_high_noise": False})
    tr = loop.setup(params, ws)
    assert list(tr.experts) == ["low"] and tr.dists["low"].band == (0.0, 875.0)
    loop.train(tr)
    assert all("loss_low" in r for r in tr.history)
    assert not (ws / "data/lora/high").exists()


def test_params_that_select_no_expert():
    with pytest.raises(ParamsError, match="train_high_noise and train_low_noise are both false"):
        parse_params({"multistage": {"train_high_noise": False, "train_low_noise": False}})


def test_adamw8bit_without_bitsandbytes_stops_before_the_experts_load(ws, template, monkeypatch):
    """Found on an H200 without bitsandbytes: the optimizer error came after ~10 minutes of
    quantizing and fitting both experts. Setup now asks for the optimizer's library first."""
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as when it is not installed

    def loaded(*args, **kwargs):
        raise AssertionError("the experts were loaded before the optimizer was checked")

    monkeypatch.setattr(loop, "_load_experts", loaded)
    with pytest.raises(RuntimeError, match="bitsandbytes cannot be loaded.*set train.optimizer: adamw"):
        loop.setup(tiny_params(template[1], train={"optimizer": "adamw8bit"}), ws)


def test_dataset_with_no_valid_samples(ws, template):
    for f in (ws / "data/cache/latents").iterdir():
        f.unlink()
    with pytest.raises(InputError, match=r"samples.jsonl: no sample can be trained \(2 problem"):
        loop.setup(tiny_params(template[1]), ws)


def test_latent_cache_of_another_model(ws, template):
    write_latents(ws, template[1], vae="0123456789abcdef")
    with pytest.raises(InputError, match="latent cache made by VAE '0123456789abcdef'.*dvc repro -f -s latent_cache"):
        loop.setup(tiny_params(template[1]), ws)


def test_text_cache_of_another_model(ws, template):
    index = ws / "data/cache/text/index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps({**data, "encoder": "other+encoder"}))
    with pytest.raises(RuntimeError, match="made with text encoder other\\+encoder.*text_cache"):
        loop.setup(tiny_params(template[1]), ws)


def test_nan_loss_skips_then_stops(ws, template):
    for f in (ws / "data/cache/latents").glob("*.safetensors"):
        from safetensors.torch import save

        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
        tensors = load_file(f)
        tensors["mean"][0, 0, 0, 0] = float("nan")
        f.write_bytes(save(tensors, meta))
    tr = loop.setup(tiny_params(template[1], train={"steps": 10, "max_bad_steps": 3}), ws)
    before = {k: v.clone() for k, v in tr.experts["high"].state_dict().items() if "lora_" in k}
    with pytest.raises(loop.BadLossError, match="3 non-finite losses in a row.*max_bad_steps=3"):
        loop.train(tr)
    assert tr.step == 2  # two skipped steps, the third raised
    after = tr.experts["high"].state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # nothing was updated


def test_disk_full_while_saving_leaves_no_partial_checkpoint(ws, template, monkeypatch):
    params = tiny_params(template[1], train={"steps": 4}, save={"every": 2})
    tr = loop.setup(params, ws)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if tr.step == 4 and len(calls) > 2:  # the LoRA pair got written, the state did not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    def tracking_save(t):
        calls.clear()
        return real_save(t)

    real_save = loop.save_checkpoint
    monkeypatch.setattr("wanlora.io.os.fsync", fsync)
    monkeypatch.setattr(loop, "save_checkpoint", tracking_save)
    with pytest.raises(OSError, match="No space left"):
        loop.train(tr)
    state = tr.state_dir
    assert json.loads((state / "latest.json").read_text()) == {"dir": "state_000002", "step": 2}
    # no temp file anywhere in the state (the previews' and monitor's `.publish` folder may stay, empty of them)
    leftovers = sorted(p.name for p in state.rglob("*") if (p.is_file() and p.name.startswith(".")) or "000004" in p.name)
    assert leftovers == []
    assert sorted(p.name for p in (ws / "data/lora/high").iterdir()) == ["step_000002.safetensors"]
    # and the run resumes from step 2 once there is space again
    monkeypatch.undo()
    tr2 = loop.setup(params, ws)
    assert loop.load_checkpoint(tr2) and tr2.step == 2


def test_uncached_dataset_encodes_on_the_fly_like_the_cache(ws, template):
    """cache_latents: false decodes the frames and runs the VAE each step; the latent it draws
    equals the one drawn from the latent_cache stage's file with the same generator state."""
    from wanlora.media.synth import Shot, moving_frames, write_video
    from wanlora.models.latents import run_stage as latent_cache

    for i in range(2):
        write_video(ws / f"data/raw/clip{i}.mp4", moving_frames(Shot(seed=i), 32, 32, 5), 16.0)
    shutil.rmtree(ws / "data/cache/latents")
    latent_cache(root=template[1], samples_manifest=ws / "data/buckets/samples.jsonl", workspace=ws,
                 out_dir=ws / "data/cache/latents", mode="distribution", dtype="fp32", device="cpu",
                 enabled_datasets={"main"}, folders={"main": "data/raw"})
    cached = loop.setup(tiny_params(template[1], train={"steps": 2}), ws)
    live = loop.setup(tiny_params(template[1], train={"steps": 2}, datasets={"main": {"cache_latents": False}}), ws)
    assert cached.data.items[0].cached and not live.data.items[0].cached
    a = cached.data.latent(1, torch.Generator().manual_seed(0))
    b = live.data.latent(1, torch.Generator().manual_seed(0))
    assert a.shape == (16, 2, 4, 4) and torch.allclose(a, b, atol=1e-5)
    loop.train(live)
    losses = [r.get("loss_high", r.get("loss_low")) for r in live.history]
    assert len(losses) == 2 and all(0 < v < 100 for v in losses)


def test_dropped_caption_is_the_trigger_alone_and_dop_the_class_alone(ws, template):
    """On a dropped sample AI Toolkit trains on the trigger word alone and DOP's class prompt is
    the class word alone (toolkit/dataloader_mixins.py, `get_dropout_caption` and
    `get_dop_dropout_caption`, read by `load_prompt_embedding` on the cached path; the live path
    injects the trigger into the dropped '' and replaces it by the class in SDTrainer's
    `replace_trigger_with_class`); with no trigger word both are the empty caption."""
    from wanlora.models.text import load_text_embeds, pad_embeds

    def embeds(text: str) -> torch.Tensor:
        return pad_embeds([load_text_embeds(ws / loop.TEXT_DIR, text)] * 2)

    def batch(**job):
        params = tiny_params(template[1], job={"device": "cpu", "seed": 3, **job},
                             train={"caption_dropout": 1.0, "dop": {"enabled": True, "preservation_class": "person"}})
        tr = loop.setup(params, ws)
        return loop.make_batch(tr, [0, 1], "high", torch.Generator().manual_seed(0))

    dropped = batch()
    assert torch.equal(dropped.embeds, embeds("sks")) and torch.equal(dropped.class_embeds, embeds("person"))
    assert not torch.equal(embeds("sks"), embeds(""))
    blank = batch(trigger_word="")
    assert torch.equal(blank.embeds, embeds("")) and torch.equal(blank.class_embeds, embeds(""))


def test_each_expert_sees_only_its_band_in_the_loop(ws, template, monkeypatch):
    """Proportional choice, high-noise-biased shift schedule: every timestep the high expert
    trains on is >= 875, every one of the low expert's is below; DOP is logged beside the loss."""
    seen: list[tuple[str, float]] = []
    real = step_module.training_step

    def spy(model, batch, **kw):
        name = next(e for e, m in tr.experts.items() if m is model)
        seen.extend((name, float(t)) for t in batch.timesteps)
        return real(model, batch, **kw)

    params = tiny_params(template[1], train={"steps": 24, "timestep_type": "shift", "timestep_bias": "high_noise",
                                             "dop": {"enabled": True}},
                         multistage={"expert_choice": "proportional"})
    tr = loop.setup(params, ws)
    monkeypatch.setattr(step_module, "training_step", spy)
    loop.train(tr)
    high = [t for e, t in seen if e == "high"]
    low = [t for e, t in seen if e == "low"]
    assert high and low and min(high) >= 875.0 and max(low) < 875.0
    assert all(("dop_high" in r) == ("loss_high" in r) and r.get("dop_high", r.get("dop_low")) >= 0
               for r in tr.history)


@pytest.mark.parametrize("mode,recovery", [("qfloat8", "none"), ("nf4", "none"), ("uint4", "fitted")])
def test_lora_trains_on_a_quantized_base(ws, template, mode, recovery):
    """Every quantization mode goes through the same loop: the base stays quantized (20 linears of
    the tiny expert), the LoRA moves, the losses stay close to the bf16 base's, and fitted 4-bit
    recovery is calibrated on the cached samples."""
    from wanlora.models.quant import quant_kind, quantized_modules
    from wanlora.models.recovery import corrections

    q = {"transformer": mode, "group_size": 32, "recovery": {"source": recovery, "rank": 4, "calibration_samples": 2}}
    one_each = {"switch_every": 1}
    tr = loop.setup(tiny_params(template[1], train={"steps": 2}, quantization=q, multistage=one_each), ws)
    loop.train(tr)
    ref = loop.setup(tiny_params(template[1], train={"steps": 2}, multistage=one_each), ws)
    loop.train(ref)
    for e, model in tr.experts.items():
        quantized = quantized_modules(model)
        assert len(quantized) == 20 and {quant_kind(m) for m in quantized.values()} != {None}
        assert (len(corrections(model)) > 0) == (recovery == "fitted")
        lora = lora_state_dict(model)
        assert all(torch.isfinite(v).all() for v in lora.values())
        assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    got = [r.get("loss_high", r.get("loss_low")) for r in tr.history]
    want = [r.get("loss_high", r.get("loss_low")) for r in ref.history]
    assert got == pytest.approx(want, rel=0.05)


def test_calibration_inputs_meet_the_expert_where_it_loads(ws, template, monkeypatch):
    """Fitted 4-bit recovery calibrates each expert on inputs on the device it loads into, in the
    base's dtype. Found by review of the GPU path: the expert that waits in host memory got inputs
    on the GPU, and a bf16 base got float32 latents (its patch embedding refused them). The meta
    device stands in for the GPU: setup stops once both experts were asked to load."""
    class Loaded(Exception):
        pass

    seen = {}

    def load_expert(root, expert, params, workspace, device, dtype, where, calib):
        seen[expert] = (where, calib)
        if len(seen) == 2:
            raise Loaded
        return torch.nn.Module(), []

    monkeypatch.setattr(loop, "_load_expert", load_expert)
    q = {"transformer": "uint4", "group_size": 32, "recovery": {"source": "fitted", "rank": 4, "calibration_samples": 2}}
    params = tiny_params(template[1], quantization=q, model={"dtype": "bf16"})
    with pytest.raises(Loaded):
        loop.setup(params, ws, DistEnv(device=torch.device("meta")))
    assert sorted(seen) == ["high", "low"]
    for where, calib in seen.values():
        assert len(calib) == 2
        for kw in calib:
            assert {t.device for t in kw.values()} == {where}
            assert kw["hidden_states"].dtype == kw["encoder_hidden_states"].dtype == torch.bfloat16


def test_a_quantized_cache_hit_reads_only_the_unquantized_tensors(ws, template, monkeypatch):
    """The second run of a float8 setup takes the block linears from the quantization cache: the
    loader is asked to skip all 20 of each expert, and training is identical to the first run
    (with fp8 matmuls on: every float8 layer runs them)."""
    from wanlora.models import loading
    from wanlora.models.quant import Float8Linear

    q = {"transformer": "float8", "fp8_matmul": True}
    first = loop.setup(tiny_params(template[1], train={"steps": 2}, quantization=q), ws)
    loop.train(first)
    skips = []
    real = loading.load_transformer
    monkeypatch.setattr(loading, "load_transformer",
                        lambda *a, skip=(), **kw: skips.append(len(skip)) or real(*a, skip=skip, **kw))
    second = loop.setup(tiny_params(template[1], train={"steps": 2}, quantization=q), ws)
    loop.train(second)
    assert skips == [20, 20]
    layers = [m for e in second.experts.values() for m in e.modules() if isinstance(m, Float8Linear)]
    assert len(layers) == 40 and all(m.fp8_matmul for m in layers)
    assert [r.get("loss_high", r.get("loss_low")) for r in second.history] == \
        [r.get("loss_high", r.get("loss_low")) for r in first.history]


def test_qfloat8_with_both_experts_on_one_gpu_stops_before_loading(ws, template, monkeypatch):
    """Its experts could not be placed (see accel.QFLOAT8_MOVES): say so before loading anything.
    The meta device stands in for the GPU."""
    monkeypatch.setattr(loop, "_load_expert", lambda *a: pytest.fail("must stop before loading"))
    params = tiny_params(template[1], quantization={"transformer": "qfloat8"})
    with pytest.raises(UserError, match="qfloat8 experts cannot move"):
        loop.setup(params, ws, DistEnv(device=torch.device("meta")))


def test_a_base_to_quantize_is_read_into_host_memory_then_placed(ws, template, monkeypatch):
    """A cache miss reads the bf16 expert into host memory and quantizes it there layer by layer
    (a whole A14B expert in bf16, 28 GB, would not fit a 24 GB card), then moves it to `where`; a
    hit reads the few tensors the cache lacks straight into `where`. On the miss the meta device
    stands in for the GPU (on a hit meta means "not read", so that one stays on the CPU)."""
    from wanlora.models import loading
    from wanlora.models.expert import load_base
    from wanlora.models.quant import Float8Linear

    reads = []
    real = loading.load_transformer
    monkeypatch.setattr(loading, "load_transformer",
                        lambda root, e, dtype, device, skip=(): reads.append((device, len(skip)))
                        or real(root, e, dtype, device, skip=skip))
    params = tiny_params(template[1], quantization={"transformer": "float8"})
    for where in ("meta", "cpu"):  # a miss, then a hit
        model = load_base(template[1], "high", params, ws, torch.device(where), work="cpu")
        assert {t.device.type for t in model.state_dict().values()} == {where}
        assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 20
    assert reads == [("cpu", 0), ("cpu", 20)]


def test_the_sampler_gets_the_base_the_trainer_trained_against(ws, template, monkeypatch):
    """Evaluation loads each expert through `load_base(sampling=True)`: the trainer's cached 4-bit
    weights and fitted correction, nothing quantized or fitted again, outputs equal to the
    trainer's base with its LoRA switched off."""
    from wanlora.models import quant, recovery
    from wanlora.models.expert import load_base
    from wanlora.models.recovery import corrections
    from wanlora.train.lora import lora_disabled

    q = {"transformer": "uint4", "group_size": 32, "recovery": {"source": "fitted", "rank": 4, "calibration_samples": 2}}
    params = tiny_params(template[1], train={"steps": 2}, quantization=q, multistage={"switch_every": 1})
    tr = loop.setup(params, ws)
    loop.train(tr)
    monkeypatch.setattr(quant, "quantize_transformer", lambda *a, **k: pytest.fail("sampling must not quantize"))
    monkeypatch.setattr(recovery, "fit_model", lambda *a, **k: pytest.fail("sampling must not fit"))
    x = {"hidden_states": torch.randn(1, 16, 2, 4, 4), "timestep": torch.tensor([500.0]),
         "encoder_hidden_states": torch.randn(1, 8, 32), "return_dict": False}
    for e, trained in tr.experts.items():
        sampled = load_base(template[1], e, params, ws, "cpu", sampling=True)
        assert len(corrections(sampled)) == 20
        with torch.no_grad(), lora_disabled(trained):
            assert torch.equal(sampled(**x)[0], trained(**x)[0])


def test_batches_of_two_never_mix_clips_and_images(template, tmp_path, monkeypatch):
    """Three clips of 5 frames and one image (1 frame) with batch_size 2: clip batches hold two
    latents of one shape, the image trains alone, and its too-small bucket is reported."""
    ws = make_workspace(tmp_path / "ws", template[1], n_clips=4, buckets=[BUCKET, BUCKET, BUCKET, "32x32x1"])
    shapes: list[tuple[int, ...]] = []
    real = step_module.training_step
    monkeypatch.setattr(step_module, "training_step", lambda m, b, **kw: shapes.append(tuple(b.latents.shape)) or real(m, b, **kw))
    tr = loop.setup(tiny_params(template[1], train={"steps": 6, "batch_size": 2}), ws)
    loop.train(tr)
    assert set(shapes) <= {(2, 16, 2, 4, 4), (1, 16, 2, 4, 4), (1, 16, 1, 4, 4)} and (2, 16, 2, 4, 4) in shapes
    assert (1, 16, 1, 4, 4) in shapes
    report = json.loads((ws / "data/train_live/data_problems.json").read_text())
    assert [p["path"] for p in report["problems"]] == ["bucket 32x32x1"]


def test_with_ema_the_files_hold_the_averaged_weights(ws, template):
    params = tiny_params(template[1], train={"steps": 4, "ema": {"enabled": True, "decay": 0.5}},
                         multistage={"switch_every": 1}, save={"every": 4, "dtype": "fp32"})
    tr = loop.setup(params, ws)
    loop.train(tr)
    for e in ("high", "low"):
        saved = load_file(ws / f"data/lora/{e}/step_000004.safetensors")
        shadow, live = tr.emas[e].state_dict(), lora_state_dict(tr.experts[e])
        assert saved.keys() == shadow.keys()
        assert all(torch.equal(saved[k], shadow[k]) for k in saved)
        assert any(not torch.equal(saved[k], live[k]) for k in saved)  # not the raw weights
