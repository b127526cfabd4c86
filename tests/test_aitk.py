"""`wanlora import-aitk`: AI Toolkit Wan 2.2 configs become params; every unmapped key is listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from wanlora.aitk import import_config
from wanlora.config import Params, ParamsError, dump_params, parse_params

ALPHA_NOTE = ("network.linear_alpha={!r} (AI Toolkit's Wan LoRA is peft-format: alpha = rank, update scale 1, "
              "whatever linear_alpha says; imported as network.alpha {!r})")
QFLOAT8_NOTE = ("model.qtype='qfloat8' (imported as float8: the same e4m3 rounding in plain tensors, which can "
                "move between GPU and host memory and run faster (quantization.transformer: qfloat8 keeps "
                "optimum-quanto))")

# Written for this test in the shape of AI Toolkit's 24 GB Wan 2.2 example (values our own).
CONFIG_24GB = """\
job: extension
config:
  name: "tabby_cat_v2"
  process:
    - type: 'sd_trainer'
      training_folder: "runs"
      device: cuda:0
      trigger_word: "t4bby"
      performance_log_every: 50
      network:
        type: "lora"
        linear: 24
        linear_alpha: 12
      save:
        dtype: float16
        save_every: 200
        max_step_saves_to_keep: 3
      datasets:
        - folder_path: "/clips/tabby"
          caption_ext: "txt"
          caption_dropout_rate: 0.1
          num_frames: 33
          resolution: [512, 768]
      train:
        batch_size: 1
        steps: 1800
        gradient_accumulation: 2
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: true
        noise_scheduler: "flowmatch"
        timestep_type: 'linear'
        optimizer: "adamw8bit"
        lr: 2e-4
        optimizer_params:
          weight_decay: 1e-3
        dtype: bf16
        switch_boundary_every: 10
        cache_text_embeddings: true
        noise_offset: 0.1
      model:
        name_or_path: "ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16"
        arch: 'wan22_14b'
        quantize: true
        qtype: "uint4|ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors"
        quantize_te: true
        qtype_te: "qfloat8"
        low_vram: true
        model_kwargs:
          train_high_noise: true
          train_low_noise: false
      sample:
        sampler: "flowmatch"
        sample_every: 400
        width: 832
        height: 480
        num_frames: 33
        fps: 16
        prompts:
          - "[trigger] sleeping on a windowsill"
          - "[trigger] chasing a red ball"
        neg: "blurry"
        seed: 7
        walk_seed: true
        guidance_scale: 4
        sample_steps: 30
meta:
  name: "[name]"
  version: '2.0'
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_24gb_example_maps_every_key(tmp_path):
    params, unmapped = import_config(write(tmp_path, CONFIG_24GB))
    assert (params.job.name, params.job.trigger_word, params.job.device, params.job.output_dir) == (
        "tabby_cat_v2", "t4bby", "cuda:0", "runs")
    assert (params.network.rank, params.network.alpha) == (24, 24.0)  # peft format: alpha = rank
    assert (params.save.dtype, params.save.every, params.save.keep_last) == ("fp16", 200, 3)
    assert list(params.datasets) == ["tabby"]
    ds = params.datasets["tabby"]
    assert (ds.folder, ds.captions.extension, ds.bucket.resolutions, ds.bucket.num_frames) == (
        "/clips/tabby", "txt", [512, 768], [33])
    t = params.train
    assert (t.steps, t.batch_size, t.gradient_accumulation, t.optimizer, t.lr, t.weight_decay) == (
        1800, 1, 2, "adamw8bit", 2e-4, 1e-3)
    assert (t.eps, t.max_grad_norm) == (5e-7, 0.5)  # AI Toolkit sums the 2 micro-batch gradients; we average
    assert (t.timestep_type, t.timestep_bias, t.caption_dropout, t.cache_text_embeddings) == (
        "linear", "balanced", 0.1, True)
    assert (t.dop.enabled, t.ema.enabled, t.differential_guidance.enabled) == (False, False, False)
    assert params.multistage.switch_every == 10
    assert (params.multistage.train_high_noise, params.multistage.train_low_noise) == (True, False)
    q = params.quantization
    assert (q.transformer, q.text_encoder) == ("uint4", "qfloat8")
    assert q.recovery.source == "ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors"
    m = params.model
    assert (m.name_or_path, m.low_vram, m.dtype) == ("ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16", True, "bf16")
    s = params.sample
    assert s.prompts == ["[trigger] sleeping on a windowsill", "[trigger] chasing a red ball"]
    assert (s.width, s.height, s.num_frames, s.fps, s.seed, s.walk_seed) == (832, 480, 33, 16, 7, True)
    assert (s.guidance_scale, s.steps, s.negative_prompt, s.every_checkpoint, s.baseline) == (4.0, 30, "blurry", 2, True)
    assert unmapped == [
        ALPHA_NOTE.format(12, 24.0),
        "train.noise_offset=0.1 (not supported)",
        "meta.name='[name]' (not used: wanlora writes its own lineage metadata)",
        "meta.version='2.0' (not used: wanlora writes its own lineage metadata)",
    ]
    # the result is a normal params file
    assert parse_params(yaml.safe_load(dump_params(params))) == params


CONFIG_TWO_DATASETS_DOP = {
    "job": "extension",
    "config": {
        "name": "anna",
        "process": [{
            "type": "diffusion_trainer",
            "sqlite_db_path": "./aitk_db.db",
            "trigger_word": None,
            "network": {"type": "lora", "linear": 16, "linear_alpha": 16, "conv": 16, "conv_alpha": 16,
                        "network_kwargs": {"ignore_if_contains": []}},
            "save": {"dtype": "bf16", "save_every": 250, "max_step_saves_to_keep": 4, "save_format": "diffusers",
                     "push_to_hub": False},
            "datasets": [
                {"folder_path": "data/anna", "caption_ext": ".txt", "caption_dropout_rate": 0.05, "num_frames": 41,
                 "resolution": 512, "trigger_word": "anna_w", "flip_x": True, "is_reg": False, "num_repeats": 1,
                 "default_caption": "a photo of [trigger]"},
                {"folder_path": "data/anna/", "caption_dropout_rate": 0.2, "num_frames": 1, "resolution": [768],
                 "trigger_word": "annie", "num_repeats": 3, "shrink_video_to_frames": False, "fps": 16},
            ],
            "train": {"steps": 2500, "optimizer": "prodigy", "lr": 1.0, "timestep_type": "weighted",
                      "content_or_style": "style", "diff_output_preservation": True,
                      "diff_output_preservation_multiplier": 0.5, "diff_output_preservation_class": "woman",
                      "ema_config": {"use_ema": True, "ema_decay": 0.995}, "do_differential_guidance": True,
                      "differential_guidance_scale": 2.0, "skip_first_sample": True, "unload_text_encoder": True,
                      "lr_scheduler": "cosine_with_restarts"},
            "model": {"name_or_path": "/weights/wan22", "arch": "wan22_14b", "quantize": True, "qtype": "qfloat8",
                      "quantize_te": False, "layer_offloading": True, "layer_offloading_transformer_percent": 0.5,
                      "model_kwargs": {}},
            "sample": {"sample_every": 250, "samples": [{"prompt": "[trigger] at a desk"},
                                                        {"prompt": "[trigger] on a bike", "seed": 3}],
                       "num_frames": 41},
        }],
    },
}


def test_two_datasets_and_dop(tmp_path):
    params, unmapped = import_config(write(tmp_path, json.dumps(CONFIG_TWO_DATASETS_DOP), "job.json"))
    assert list(params.datasets) == ["anna", "ds1"]  # same folder name twice: the second is numbered
    a, b = params.datasets["anna"], params.datasets["ds1"]
    assert (a.folder, a.bucket.num_frames, a.bucket.resolutions, a.flip_horizontal) == ("data/anna", [41], [512], True)
    assert a.captions.default_caption == "a photo of [trigger]"
    assert (b.bucket.num_frames, b.bucket.resolutions, b.bucket.frame_sampling, b.bucket.fps) == (
        [1], [768], "window", 16.0)
    assert params.job.trigger_word == "anna_w"  # no global trigger: the first dataset's
    t = params.train
    assert (t.dop.enabled, t.dop.multiplier, t.dop.preservation_class) == (True, 0.5, "woman")
    assert (t.ema.enabled, t.ema.decay) == (True, pytest.approx(0.995 ** 2))  # experts alternate every step
    assert (t.differential_guidance.enabled, t.differential_guidance.scale) == (True, 2.0)
    assert t.unload_text_encoder  # same meaning in both: captions ignored, the trigger word alone
    assert (t.timestep_type, t.timestep_bias, t.caption_dropout) == ("weighted", "low_noise", 0.05)
    assert (t.optimizer, t.lr) == ("adamw8bit", 1e-4)  # prodigy's lr not carried over
    assert t.lr_scheduler == "cosine"  # T_0 = steps: one cosine period over the run
    assert params.multistage.switch_every == 1  # AI Toolkit's default when absent
    assert (params.network.rank, params.network.alpha) == (16, 16.0)
    assert (params.quantization.transformer, params.quantization.text_encoder) == ("float8", "none")  # see QFLOAT8_NOTE
    assert (params.model.layer_offloading, params.model.layer_offloading_fraction) == (True, 0.5)
    assert params.sample.prompts == ["[trigger] at a desk", "[trigger] on a bike"]
    assert (params.sample.baseline, params.sample.every_checkpoint, params.sample.num_frames) == (False, 1, 41)
    assert (params.sample.guidance_scale, params.sample.steps, params.sample.seed) == (7.0, 20, 0)  # AI Toolkit defaults
    assert unmapped == [
        QFLOAT8_NOTE,
        "train.optimizer='prodigy' (not supported: use adamw8bit, adamw, adafactor; kept adamw8bit)",
        "train.lr=1.0 (belongs to prodigy; kept wanlora's default)",
        "datasets[1].caption_dropout_rate=0.2 (one rate for all datasets: kept 0.05 from datasets[0].caption_dropout_rate)",
        "datasets[1].trigger_word='annie' (one trigger word for all datasets: kept job.trigger_word 'anna_w')",
        "sample.samples[1].seed=3 (per-prompt settings not supported: every prompt uses the sample.* values)",
        "datasets[1].num_repeats=3 (not supported)",
    ]


def test_out_of_range_names_both_keys(tmp_path):
    text = CONFIG_24GB.replace("linear: 24", "linear: 2048").replace("num_frames: 33\n          resolution",
                                                                       "num_frames: 32\n          resolution")
    with pytest.raises(ParamsError) as err:
        import_config(write(tmp_path, text))
    msg = str(err.value)
    assert "network.rank: Input should be less than or equal to 1024 (got 2048)" in msg
    assert "network.rank came from AI Toolkit network.linear=2048" in msg
    assert "datasets.tabby.bucket.num_frames: frame counts must be 4n+1" in msg
    assert "datasets.tabby.bucket.num_frames came from AI Toolkit datasets[0].num_frames=[32]" in msg


def test_wrong_arch_and_bad_files(tmp_path):
    with pytest.raises(ParamsError, match="model.arch='flux': wanlora imports Wan 2.2 A14B jobs: "
                                          "wan22_14b \\(t2v-a14b\\), wan22_14b_i2v \\(i2v-a14b\\), "
                                          "wan22_5b \\(ti2v-5b\\)"):
        import_config(write(tmp_path, CONFIG_24GB.replace("arch: 'wan22_14b'", "arch: 'flux'")))
    with pytest.raises(ParamsError, match="no config.process list; expected an AI Toolkit job config"):
        import_config(write(tmp_path, "job: extension\nconfig: {name: x}\n"))
    with pytest.raises(ParamsError, match="no config.process list"):
        import_config(write(tmp_path, "config: [1, 2]\n"))
    with pytest.raises(ParamsError, match=r"config.process\[0\].datasets is empty; add a dataset with a folder_path"):
        import_config(write(tmp_path, CONFIG_24GB.replace("datasets:", "datasets: []\n      old_datasets:")))
    with pytest.raises(ParamsError, match="not valid YAML"):
        import_config(write(tmp_path, "config: [unclosed\n"))
    with pytest.raises(ParamsError, match=r"model.qtype='nf3': no wanlora equivalent; use one of qfloat8, float8, uint4"):
        import_config(write(tmp_path, CONFIG_24GB.replace('qtype: "uint4|', 'qtype: "nf3|')))


def test_nearest_qtype_and_missing_adapter(tmp_path):
    params, unmapped = import_config(write(tmp_path, CONFIG_24GB.replace(
        'qtype: "uint4|ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors"', 'qtype: "uint3"')))
    assert (params.quantization.transformer, params.quantization.recovery.source) == ("uint4", "none")
    assert "model.qtype='uint3' (not supported: imported as the nearest wanlora type, uint4)" in unmapped


@pytest.mark.parametrize(("aitk", "ours"), [("balanced", "balanced"), ("content", "high_noise"), ("style", "low_noise")])
def test_content_or_style_is_noise_level(tmp_path, aitk, ours):
    text = CONFIG_24GB.replace("timestep_type: 'linear'", f"timestep_type: 'linear'\n        content_or_style: {aitk}")
    assert import_config(write(tmp_path, text))[0].train.timestep_bias == ours


def test_keys_outside_the_process_are_reported(tmp_path):
    text = CONFIG_24GB.replace('  name: "tabby_cat_v2"', '  name: "tabby_cat_v2"\n  seed: 5') + "extra: 1\n"
    unmapped = import_config(write(tmp_path, text))[1]
    assert unmapped[-2:] == ["config.seed=5 (not supported)", "extra=1 (not supported)"]


def test_ui_generated_job(tmp_path):
    """The shape AI Toolkit's web UI saves: tagged arch, samples list, UI-only keys at their defaults."""
    job = {"job": "extension", "config": {"name": "ui_job", "process": [{
        "type": "diffusion_trainer", "training_folder": "output", "sqlite_db_path": "./aitk_db.db", "device": "cuda",
        "trigger_word": "ohwx", "performance_log_every": 10,
        "network": {"type": "lora", "linear": 32, "linear_alpha": 32, "conv": 16, "conv_alpha": 16,
                    "lokr_full_rank": True, "lokr_factor": -1, "network_kwargs": {"ignore_if_contains": []}},
        "save": {"dtype": "bf16", "save_every": 250, "max_step_saves_to_keep": 4, "save_format": "diffusers",
                 "push_to_hub": False},
        "datasets": [{"folder_path": "/datasets/ohwx", "mask_path": None, "mask_min_value": 0.1, "default_caption": "",
                      "caption_ext": "txt", "caption_dropout_rate": 0.05, "cache_latents_to_disk": False,
                      "is_reg": False, "network_weight": 1, "resolution": [512], "controls": [],
                      "shrink_video_to_frames": True, "num_frames": 41, "flip_x": False, "flip_y": False,
                      "num_repeats": 1, "fps": 16}],
        "train": {"batch_size": 1, "bypass_guidance_embedding": True, "steps": 3000, "gradient_accumulation": 1,
                  "train_unet": True, "train_text_encoder": False, "gradient_checkpointing": True,
                  "noise_scheduler": "flowmatch", "optimizer": "adamw8bit", "timestep_type": "linear",
                  "content_or_style": "balanced", "optimizer_params": {"weight_decay": 0.0001},
                  "unload_text_encoder": False, "cache_text_embeddings": True, "lr": 0.0001,
                  "ema_config": {"use_ema": False, "ema_decay": 0.99}, "skip_first_sample": False,
                  "force_first_sample": False, "disable_sampling": False, "dtype": "bf16",
                  "diff_output_preservation": False, "diff_output_preservation_multiplier": 1.0,
                  "diff_output_preservation_class": "person", "switch_boundary_every": 1, "loss_type": "mse"},
        "logging": {"log_every": 1, "use_ui_logger": True},
        "model": {"name_or_path": "ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16", "quantize": True,
                  "qtype": "uint4|ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors",
                  "quantize_te": True, "qtype_te": "qfloat8", "arch": "wan22_14b:t2v", "low_vram": True,
                  "model_kwargs": {"train_high_noise": True, "train_low_noise": True}, "compile": False},
        "sample": {"sampler": "flowmatch", "sample_every": 250, "sample_start_step": 0, "width": 832, "height": 480,
                   "samples": [{"prompt": "ohwx waving"}], "neg": "", "seed": 42, "walk_seed": True,
                   "guidance_scale": 4, "sample_steps": 30, "num_frames": 41, "fps": 16},
    }]}, "meta": {"name": "[name]", "version": "1.0"}}
    params, unmapped = import_config(write(tmp_path, json.dumps(job), "ui.json"))
    assert unmapped == ["meta.name='[name]' (not used: wanlora writes its own lineage metadata)",
                        "meta.version='1.0' (not used: wanlora writes its own lineage metadata)"]
    assert (params.train.dop.enabled, params.train.dop.preservation_class) == (False, "person")
    assert (params.network.rank, params.datasets["ohwx"].bucket.num_frames, params.sample.prompts) == (
        32, [41], ["ohwx waving"])
    assert (params.quantization.transformer, params.multistage.switch_every, params.job.device) == ("uint4", 1, "cuda")


# ------------------------------------------------------------ untrusted configs (issue 22)
ALIAS_BOMB = CONFIG_24GB.replace("meta:\n", """\
lol: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
lol2: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
lol3: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
lol4: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
lol5: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
lol6: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
lol7: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
lol8: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
lol9: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
meta:
""")


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    """The review's experiment: a 645-byte alias bomb took 58 s and printed 5 MB in import-aitk.
    Run in a subprocess so that the old behaviour fails on the time bound instead of hanging."""
    import subprocess
    import sys

    path = write(tmp_path, ALIAS_BOMB)
    code = ("import sys\nfrom pathlib import Path\nfrom wanlora.aitk import import_config\n"
            "try:\n    import_config(Path(sys.argv[1]))\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("ParamsError") and "expands to more than 100,000 values" in out.stdout, out.stdout[:2000]
    assert len(out.stdout) < 1000
    # a recursive alias is infinitely large: refused the same way
    with pytest.raises(ParamsError, match="expands to more than"):
        import_config(write(tmp_path, CONFIG_24GB.replace("meta:\n", "loop: &x [*x]\nmeta:\n")))


def test_small_aliases_import_and_long_values_are_shortened_in_notes(tmp_path):
    text = CONFIG_24GB.replace('    - type: \'sd_trainer\'', '    - type: \'sd_trainer\'\n      odd: &o {a: 1}\n      odd2: *o')
    text = text.replace("meta:\n", f"huge: {'x' * 100_000}\nmeta:\n")
    params, unmapped = import_config(write(tmp_path, text))
    assert "odd.a=1 (not supported)" in unmapped and "odd2.a=1 (not supported)" in unmapped
    huge = next(n for n in unmapped if n.startswith("huge="))
    assert len(huge) < 300 and huge.endswith("... (100,002 characters) (not supported)")


def test_paths_that_leave_the_workspace_are_flagged(tmp_path):
    text = (CONFIG_24GB.replace('name: "tabby_cat_v2"', 'name: "../../../x"')
            .replace('training_folder: "runs"', 'training_folder: "/home/someone/ai-toolkit/output"')
            .replace('folder_path: "/clips/tabby"', 'folder_path: "../../secrets/tabby"'))
    params, unmapped = import_config(write(tmp_path, text))
    assert params.job.name == "x"
    assert "config.name='../../../x' (not a plain file name; imported as job.name 'x')" in unmapped
    assert params.job.output_dir == "exports"
    assert any(n.startswith("training_folder='/home/someone/ai-toolkit/output' (outside the workspace") for n in unmapped)
    assert params.datasets["tabby"].folder == "../../secrets/tabby"
    assert any(n.startswith("datasets.tabby.folder='../../secrets/tabby' (has '..'") for n in unmapped)
    for bad in ('"../runs"', '"~/runs"'):
        params, _ = import_config(write(tmp_path, CONFIG_24GB.replace('training_folder: "runs"', f"training_folder: {bad}")))
        assert params.job.output_dir == "exports"
    params, unmapped = import_config(write(tmp_path, CONFIG_24GB))  # plain values pass unflagged
    assert (params.job.name, params.job.output_dir) == ("tabby_cat_v2", "runs")
    assert not any("outside the workspace" in n or "plain file name" in n for n in unmapped)


def test_an_i2v_job_imports_as_the_i2v_variant(tmp_path):
    """AI Toolkit's `wan22_14b_i2v` arch (Wan2214bI2VModel, extensions_built_in/diffusion_models/wan22/
    wan22_14b_i2v_model.py) becomes model.variant i2v-a14b; a job without name_or_path gets the
    official I2V release; per-prompt start images (`ctrl_img`) are reported, not silently dropped."""
    text = CONFIG_24GB.replace("arch: 'wan22_14b'", "arch: 'wan22_14b_i2v'")
    params, notes = import_config(write(tmp_path, text))
    assert params.model.variant == "i2v-a14b"
    assert params.model.name_or_path == "ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16"  # given: kept as it is
    bare = text.replace('        name_or_path: "ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16"\n', "")
    assert bare != text
    params, _ = import_config(write(tmp_path, bare, "bare.yaml"))
    assert params.model.name_or_path == "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
    assert import_config(write(tmp_path, CONFIG_24GB, "t2v.yaml"))[0].model.variant == "auto"
    samples = text.replace("      sample:\n", "      sample:\n        samples:\n          - prompt: 'sks waves'\n"
                           "            ctrl_img: /home/me/start.png\n", 1)
    assert samples != text
    _, notes = import_config(write(tmp_path, samples, "samples.yaml"))
    assert any("ctrl_img" in n and "sample.images" in n for n in notes)


def test_a_5b_job_imports_as_ti2v_with_do_i2v_as_the_i2v_share(tmp_path):
    """AI Toolkit's `wan22_5b` arch (Wan225bModel, extensions_built_in/diffusion_models/wan22/
    wan22_5b_model.py) becomes model.variant ti2v-5b on the official 5B release. It has one
    transformer, so switch_boundary_every and train_high/low_noise are reported, not set (the 5B
    trainer refuses multistage settings), and the EMA decay is not squared for alternating experts;
    `do_i2v` (get_noise_prediction: every video conditioned on its first frame) is i2v_share 1.0,
    its absence (AI Toolkit's default False: text-to-video only) 0.0."""
    from wanlora.models.variant import VARIANTS
    from wanlora.train.ti2v import check_params

    text = (CONFIG_24GB.replace("arch: 'wan22_14b'", "arch: 'wan22_5b'")
            .replace('        name_or_path: "ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16"\n', "")
            .replace('qtype: "uint4|ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors"',
                     'qtype: "qfloat8"')
            .replace("          resolution: [512, 768]\n", "          resolution: [512, 768]\n          do_i2v: true\n")
            .replace("        gradient_accumulation: 2\n", "        gradient_accumulation: 1\n        ema_config:\n"
                     "          use_ema: true\n          ema_decay: 0.99\n"))
    params, notes = import_config(write(tmp_path, text))
    assert (params.model.variant, params.model.name_or_path) == ("ti2v-5b", "Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    assert params.multistage == Params().multistage
    check_params(params, VARIANTS["ti2v-5b"])  # nothing the 5B trainer would refuse
    assert params.datasets["tabby"].i2v_share == 1.0
    assert params.train.ema.decay == 0.99  # one transformer: every optimizer step is its own
    assert any(n.startswith("train.switch_boundary_every=10 (TI2V 5B is one transformer") for n in notes)
    assert any(n.startswith("model.model_kwargs.train_low_noise=False (TI2V 5B is one transformer") for n in notes)
    t2v_only, _ = import_config(write(tmp_path, text.replace("          do_i2v: true\n", ""), "t2v.yaml"))
    assert t2v_only.datasets["tabby"].i2v_share == 0.0
