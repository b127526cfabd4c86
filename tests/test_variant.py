"""The variant switch: which Wan 2.2 model a folder holds, and files of one refused on another."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from wanlora.config import ParamsError, parse_params
from wanlora.models.variant import VARIANTS, VariantError, detect_variant, recorded_variant, resolve_variant
from wanlora.models.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny_t2v(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("t2v") / "model")


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("i2v") / "model", variant="i2v-a14b")


def _configs(root: Path, index: dict, transformer: dict, vae: dict) -> Path:
    """A folder with only the three configs `detect_variant` reads, as the hub releases have them."""
    for rel, data in (("model_index.json", index), ("transformer/config.json", transformer),
                      ("vae/config.json", vae)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data))
    return root


def test_tiny_folders_are_detected_as_their_variant(tiny_t2v, tiny_i2v):
    """make-tiny writes each variant in its release's layout: the I2V one as diffusers'
    WanImageToVideoPipeline with two 36-channel experts, boundary 0.9 and no image encoder."""
    from diffusers import WanImageToVideoPipeline

    assert detect_variant(tiny_t2v).name == "t2v-a14b"
    assert detect_variant(tiny_i2v).name == "i2v-a14b"
    index = json.loads((tiny_i2v / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["boundary_ratio"] == 0.9 and index["image_encoder"] == [None, None]
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_i2v)
    assert pipe.transformer.config.in_channels == pipe.transformer_2.config.in_channels == 36
    assert pipe.transformer.config.out_channels == 16 and pipe.transformer.config.image_dim is None
    assert pipe.config.boundary_ratio == 0.9


def test_the_5b_layout_is_detected(tmp_path):
    """Wan-AI/Wan2.2-TI2V-5B-Diffusers: one transformer, 48 channels, expand_timesteps."""
    root = _configs(tmp_path, {"_class_name": "WanPipeline", "expand_timesteps": True, "boundary_ratio": None,
                               "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None]},
                    {"in_channels": 48, "out_channels": 48}, {"z_dim": 48})
    assert detect_variant(root) is VARIANTS["ti2v-5b"]


def test_wan21_i2v_is_refused_naming_what_was_found(tmp_path):
    root = _configs(tmp_path, {"_class_name": "WanImageToVideoPipeline", "transformer": ["diffusers", "x"]},
                    {"in_channels": 36, "out_channels": 16, "image_dim": 1280}, {"z_dim": 16})
    with pytest.raises(VariantError) as err:
        detect_variant(root)
    msg = str(err.value)
    assert "in_channels 36" in msg and "one transformer" in msg and "image_dim 1280" in msg
    assert "Wan-AI/Wan2.2-I2V-A14B-Diffusers" in msg


def test_experts_of_two_widths_are_refused(tmp_path, tiny_t2v, tiny_i2v):
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_t2v, mixed)
    shutil.rmtree(mixed / "transformer_2")
    shutil.copytree(tiny_i2v / "transformer_2", mixed / "transformer_2")
    with pytest.raises(VariantError, match="transformer/ takes 16 channels but transformer_2/ takes 36"):
        detect_variant(mixed)


def test_an_explicit_variant_must_agree_with_the_folder(tiny_t2v, tiny_i2v):
    assert resolve_variant("auto", tiny_i2v).name == "i2v-a14b"
    assert resolve_variant("i2v-a14b", tiny_i2v).name == "i2v-a14b"
    with pytest.raises(VariantError) as err:
        resolve_variant("i2v-a14b", tiny_t2v)
    msg = str(err.value)
    assert "model.variant is i2v-a14b" in msg and "t2v-a14b (Wan 2.2 T2V A14B: 16 input channels" in msg
    assert "36 input channels = 16 latent + 4 mask + 16 start-image latent" in msg
    assert "Wan-AI/Wan2.2-I2V-A14B-Diffusers" in msg and "model.variant: auto" in msg


def test_params_accept_the_variants_and_nothing_else():
    assert parse_params({}).model.variant == "auto"
    assert parse_params({"model": {"variant": "i2v-a14b"}}).model.variant == "i2v-a14b"
    with pytest.raises(ParamsError, match="model.variant"):
        parse_params({"model": {"variant": "i2v"}})


def test_files_without_a_variant_were_made_for_t2v():
    """Caches and LoRAs written before the switch carry no variant: they are T2V A14B files."""
    assert recorded_variant({}) == "t2v-a14b"
    assert recorded_variant({"wanlora.variant": "i2v-a14b"}) == "i2v-a14b"
    assert recorded_variant({"variant": "ti2v-5b"}) == "ti2v-5b"


def test_a_t2v_latent_cache_is_refused_by_an_i2v_trainer(tmp_path, tiny_i2v):
    """I2V A14B has T2V's VAE, so the VAE identity alone would accept a T2V cache, which lacks
    the start-image condition latents: the index's variant refuses it, naming the fix."""
    from _helpers import write_inputs, write_latents

    from wanlora.data.dataset import CacheMismatch, build_dataset
    from wanlora.models.latents import CacheError

    write_inputs(tmp_path)
    write_latents(tmp_path, tiny_i2v)  # as made before the switch: no variant in index.json
    kw = dict(vae_config=json.loads((tiny_i2v / "vae/config.json").read_text()), expect_vae=None,
              cached_datasets={"main"}, folders={"main": "data/raw"})
    assert len(build_dataset(tmp_path, **kw).items) == 2  # a T2V trainer reads it
    with pytest.raises((VariantError, CacheMismatch, CacheError)) as err:
        build_dataset(tmp_path, **kw, variant=VARIANTS["i2v-a14b"])
    msg = str(err.value)
    assert "made for t2v-a14b" in msg and "the model is i2v-a14b" in msg and "dvc repro -f -s latent_cache" in msg


def test_train_refuses_a_variant_the_folder_does_not_hold(tmp_path, tiny_t2v):
    from _helpers import tiny_params

    from wanlora.train.loop import setup

    params = tiny_params(tiny_t2v, model={"variant": "i2v-a14b"})
    with pytest.raises(VariantError, match="model.variant is i2v-a14b, but .* holds t2v-a14b"):
        setup(params, tmp_path)


def test_the_lora_header_names_the_variant(tmp_path):
    from _helpers import write_inputs

    from wanlora.export import lineage

    write_inputs(tmp_path)
    meta = lineage.lineage_metadata(parse_params({}), tmp_path, 2, "high", "x", ["main/clip0.mp4#0"], {},
                                    variant="i2v-a14b")
    assert meta["wanlora.variant"] == "i2v-a14b" and recorded_variant(meta) == "i2v-a14b"


def test_import_lora_refuses_a_lora_recorded_for_another_variant(tmp_path):
    """A T2V LoRA has every layer shape of the I2V experts (only the patch embedding differs), so the
    shape check passes it; the variant its header records stops it, and an import records the
    variant it was checked against."""
    from _helpers import random_lora, save_ours

    from wanlora.config import DEFAULT_TARGETS
    from wanlora.export.imports import import_lora
    from wanlora.models.geometry import TINY, TINY_I2V
    from wanlora.models.tiny import tiny_expert

    model = tiny_expert(0)
    lora = random_lora(model, seed=1, targets=DEFAULT_TARGETS)  # a LoRA on patch_embedding would not fit
    t2v_file = save_ours(tmp_path / "t2v_high_noise.safetensors", lora, {"wanlora.variant": "t2v-a14b"})
    with pytest.raises(VariantError) as err:
        import_lora(t2v_file, {**TINY_I2V, "rope_max_seq_len": 32})
    assert "made for t2v-a14b" in str(err.value) and "the model is i2v-a14b" in str(err.value)
    _, meta = import_lora(t2v_file, {**TINY, "rope_max_seq_len": 32})
    assert meta["wanlora.variant"] == "t2v-a14b"
    foreign = save_ours(tmp_path / "theirs_high_noise.safetensors", lora)  # no variant: nothing to go by
    assert import_lora(foreign, {**TINY_I2V, "rope_max_seq_len": 32})[1]["wanlora.variant"] == "i2v-a14b"
