"""`wanlora init` presets: every recipe x tier parses, round-trips, and carries its stated values."""

from __future__ import annotations

import itertools

import pytest
import yaml

from wanlora.config import Params, ParamsError, load_params, parse_params
from wanlora.presets import RECIPES, TIERS, VARIANT_SETTINGS, describe, init_header, init_vram, make_params, write_params

ALL = list(itertools.product(["character", "style", "motion"], [24, 48, 80, 141]))

# What the brief states per tier: (transformer qtype, text encoder, low_vram, resolutions, frames, switch_every)
TIER_FACTS = {
    24: ("uint4", "float8", True, [512], [33], 10),
    48: ("float8", "float8", True, [512, 768], [33, 41], 10),
    80: ("float8", "float8", True, [512, 768, 1024], [41, 61], 1),
    141: ("none", "none", False, [512, 768, 1024], [41, 61, 81], 1),
}
SAMPLE_SIZE = {24: (512, 512, 33), 48: (832, 480, 41), 80: (832, 480, 81), 141: (1280, 720, 81)}
# recipe: (rank, steps, timestep_type, timestep_bias, dop enabled, dop class)
RECIPE_FACTS = {
    "character": (16, 2500, "linear", "balanced", False, "person"),
    "style": (16, 2000, "shift", "high_noise", False, "scene"),
    "motion": (16, 2000, "linear", "balanced", False, "person"),  # DOP off; class left at the default
}


@pytest.mark.parametrize(("recipe", "vram"), ALL)
def test_preset_values_and_round_trip(recipe, vram, tmp_path):
    p = make_params(recipe, vram)
    qt, te, low, res, frames, switch = TIER_FACTS[vram]
    ds = p.datasets["main"]
    assert (p.quantization.transformer, p.quantization.text_encoder, p.model.low_vram) == (qt, te, low)
    assert (ds.bucket.resolutions, ds.bucket.num_frames, p.multistage.switch_every) == (res, frames, switch)
    assert (ds.bucket.frame_sampling, ds.bucket.every_resolution, ds.bucket.fps) == ("auto", True, None)  # 16: the variant's
    rank, steps, ttype, bias, dop_on, dop_cls = RECIPE_FACTS[recipe]
    assert (p.network.rank, p.network.alpha, p.train.steps) == (rank, rank, steps)
    assert (p.train.timestep_type, p.train.timestep_bias) == (ttype, bias)
    assert (p.train.dop.enabled, p.train.dop.preservation_class) == (dop_on, dop_cls)
    assert all("[trigger]" in prompt for prompt in p.sample.prompts)
    if vram == 24:
        assert p.quantization.recovery.source == "fitted"
    assert (p.sample.width, p.sample.height, p.sample.num_frames) == SAMPLE_SIZE[vram]

    path = tmp_path / "params.yaml"
    write_params(path, p, f"wanlora init --recipe {recipe} --vram {vram}\n" + describe(recipe, vram))
    text = path.read_text()
    assert text.startswith(f"# wanlora init --recipe {recipe} --vram {vram}\n# quantization.transformer: {qt}  (")
    assert load_params(path) == p
    assert parse_params(yaml.safe_load(text)) == p


def test_model_and_trigger_override():
    p = make_params("style", 48, model="/models/wan22", trigger="ohwx")
    assert (p.model.name_or_path, p.job.trigger_word) == ("/models/wan22", "ohwx")
    assert make_params("style", 48).model.name_or_path == Params().model.name_or_path


def test_every_setting_has_a_reason_and_a_real_key():
    for s in itertools.chain(*TIERS.values(), *RECIPES.values(), *VARIANT_SETTINGS.values()):
        assert len(s.why) > 15, s.key
        node = Params().model_dump()
        for part in s.key.split("."):
            assert part in node, f"{s.key}: no such params key"
            node = node[part]


def test_bad_recipe_and_tier_messages():
    with pytest.raises(ParamsError, match="recipe 'portrait' is unknown; choose one of: character, style, motion"):
        make_params("portrait", 24)  # type: ignore[arg-type]
    with pytest.raises(ParamsError, match=r"vram 32 is not a tier \(24, 48, 80, 141\); use 24"):
        make_params("character", 32)  # type: ignore[arg-type]
    with pytest.raises(ParamsError, match="24 GB is the smallest tier"):
        make_params("character", 16)  # type: ignore[arg-type]


@pytest.mark.parametrize(("recipe", "vram"), ALL)
def test_every_preset_fits_its_tier_by_the_planner(recipe, vram):
    """`wanlora init --vram N` then `wanlora plan` (which assumes N) must not say "does NOT fit"."""
    from wanlora.plan import plan

    result = plan(make_params(recipe, vram), float(vram))
    assert result.fits, (recipe, vram, result.peak_gib)


def test_smoke_recipe_runs_on_a_cpu_without_a_gpu_tier():
    p = make_params("smoke", 24, model="models/tiny")
    assert p == make_params("smoke", 141, model="models/tiny")
    ds = p.datasets["main"]
    assert (p.job.device, p.model.dtype, p.quantization.transformer, p.model.low_vram) == ("cpu", "fp32", "none", False)
    assert (ds.bucket.resolutions, ds.bucket.num_frames, p.train.steps, p.train.optimizer) == ([64], [9], 8, "adamw")
    assert p.save.every * 2 == p.train.steps and p.sample.validation_clips == 1
    text = describe("smoke", 24)
    assert text.startswith("job.device: cpu  (") and "quantization" not in text and "GB" not in text


@pytest.mark.parametrize(("recipe", "vram"), ALL)
def test_i2v_presets_are_the_tier_and_recipe_on_the_i2v_model(recipe, vram, tmp_path):
    """`wanlora init --variant i2v-a14b`: the A14B tier and recipe as for T2V (the experts differ
    only by their patch embedding), on the official I2V release, checked by the planner at the
    I2V geometry, with a header that says so and still gives `wanlora plan` its tier."""
    from wanlora.models.geometry import WAN22_I2V_A14B
    from wanlora.plan import plan

    p = make_params(recipe, vram, variant="i2v-a14b")
    t2v = make_params(recipe, vram)
    assert (p.model.variant, p.model.name_or_path) == ("i2v-a14b", "Wan-AI/Wan2.2-I2V-A14B-Diffusers")
    assert p.model_copy(update={"model": t2v.model}) == t2v
    assert plan(p, float(vram), config=WAN22_I2V_A14B).fits
    path = tmp_path / "params.yaml"
    write_params(path, p, init_header(recipe, vram, "i2v-a14b"))
    assert path.read_text().startswith(f"# wanlora init --recipe {recipe} --vram {vram} --variant i2v-a14b\n")
    assert init_vram(path) == vram and load_params(path) == p
    assert make_params("smoke", 24, model="models/tiny", variant="i2v-a14b").model.name_or_path == "models/tiny"


TI2V_ALL = [(r, v) for r in ("character", "style", "motion") for v in (12, 16, 24)]


@pytest.mark.parametrize(("recipe", "vram"), TI2V_ALL)
def test_ti2v_presets_fit_their_12_16_24_gb_tiers(recipe, vram, tmp_path):
    """`wanlora init --variant ti2v-5b --vram 12|16|24`: the official 5B release, no multistage
    setting (one transformer: the trainer would refuse one), buckets at the 5B's own 24 fps (fps
    null), sample sides multiples of 32, and `wanlora plan` at the 5B geometry says it fits."""
    from wanlora.plan import plan
    from wanlora.train.ti2v import check_params
    from wanlora.models.variant import VARIANTS

    p = make_params(recipe, vram, variant="ti2v-5b")
    assert (p.model.variant, p.model.name_or_path) == ("ti2v-5b", "Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    assert p.multistage == Params().multistage and p.datasets["main"].bucket.fps is None
    check_params(p, VARIANTS["ti2v-5b"])  # nothing the 5B trainer refuses
    assert p.sample.width % 32 == 0 and p.sample.height % 32 == 0
    result = plan(p, float(vram))
    assert result.fits and [e.expert for e in result.experts] == ["main"], (recipe, vram, result.peak_gib)
    path = tmp_path / "params.yaml"
    write_params(path, p, init_header(recipe, vram, "ti2v-5b"))
    assert init_vram(path) == vram and load_params(path) == p
    with pytest.raises(ParamsError, match=r"vram 48 is not a tier \(12, 16, 24\); use 24"):
        make_params(recipe, 48, variant="ti2v-5b")  # type: ignore[arg-type]
    smoke = make_params("smoke", 24, model="models/tiny", variant="ti2v-5b")
    assert smoke.multistage == Params().multistage and smoke.model.name_or_path == "models/tiny"
