"""params.yaml validation: messages a person can act on, and dump/parse as an exact round trip."""

from __future__ import annotations

import types
import typing
import warnings

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from wanlora.config import Params, ParamsError, dump_params, load_params, parse_params


def error_of(data: dict) -> str:
    with pytest.raises(ParamsError) as err:
        parse_params(data)
    return str(err.value)


@pytest.mark.parametrize(("data", "line"), [
    ({"trian": {}}, "  trian: unknown key; did you mean 'train'?"),
    ({"network": {"rnak": 8}}, "  network.rnak: unknown key; did you mean 'rank'?"),
    ({"datasets": {"clips": {"bucket": {"resolution": [512]}}}},
     "  datasets.clips.bucket.resolution: unknown key; did you mean 'resolutions'?"),
    ({"train": {"dop": {"clas": "person"}}}, "  train.dop.clas: unknown key; valid keys: enabled, multiplier, preservation_class"),
])
def test_unknown_keys_suggest(data, line):
    assert line in error_of(data).splitlines()


@pytest.mark.parametrize(("frames", "nearest"), [([32], [33]), ([30], [29]), ([36, 81], [37]), ([0], [1])])
def test_bucket_frames_suggest_nearest_valid_count(frames, nearest):
    msg = error_of({"datasets": {"main": {"bucket": {"num_frames": frames}}}})
    assert "datasets.main.bucket.num_frames: frame counts must be 4n+1" in msg
    assert f": use {nearest}" in msg


def test_sample_frames_suggest_nearest():
    # the key and its value, not the whole sample section
    msg = error_of({"sample": {"num_frames": 30, "steps": 9, "prompts": ["a long prompt"]}})
    assert "sample.num_frames: must be 4n+1 (the VAE's frame grid): use 29 (got 30)" in msg
    assert "a long prompt" not in msg and "steps" not in msg
    assert "sample.num_frames: must be 4n+1 (the VAE's frame grid): use 85 (got 84)" in error_of({"sample": {"num_frames": 84}})
    assert "sample.height: must be a multiple of 16: use 480 (got 478)" in error_of({"sample": {"height": 478}})


def test_rank_above_64_warns_but_parses():
    with pytest.warns(UserWarning, match="network.rank=128 is above 64: big files, slow steps, rarely better"):
        assert parse_params({"network": {"rank": 128}}).network.rank == 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_params({"network": {"rank": 64}})  # no warning at the limit


@pytest.mark.parametrize("lr", [0, -1e-4])
def test_lr_must_be_positive(lr):
    assert f"  train.lr: Input should be greater than 0 (got {lr})" in error_of({"train": {"lr": lr}}).splitlines()


def test_sharded_base_needs_plain_adamw():
    with pytest.raises(ParamsError, match="sharded_base needs optimizer: adamw \\(got 'adamw8bit'\\)"):
        parse_params({"train": {"sharded_base": True}})
    assert parse_params({"train": {"sharded_base": True, "optimizer": "adamw"}}).train.sharded_base


def test_both_experts_off_fails():
    msg = error_of({"multistage": {"train_high_noise": False, "train_low_noise": False}})
    assert "multistage: train_high_noise and train_low_noise are both false: nothing to train; set at least one to true" in msg


def test_wrong_types_fail_and_all_problems_are_listed():
    msg = error_of({"train": {"steps": "many", "lr": "fast"}, "model": {"low_vram": "maybe"}, "network": {"rank": 16.5}})
    lines = msg.splitlines()
    assert lines[0] == "params: 4 problem(s)"
    assert "  train.steps: Input should be a valid integer, unable to parse string as an integer (got 'many')" in lines
    assert "  train.lr: Input should be a valid number, unable to parse string as a number (got 'fast')" in lines
    assert "  model.low_vram: Input should be a valid boolean, unable to interpret input (got 'maybe')" in lines
    assert "  network.rank: Input should be a valid integer, got a number with a fractional part (got 16.5)" in lines


def test_load_params_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    with pytest.raises(ParamsError, match="params.yaml: not found; run `wanlora init`"):
        load_params(path)
    path.write_text("- a list\n")
    with pytest.raises(ParamsError, match="params.yaml: top level must be a mapping of sections, got list"):
        load_params(path)
    path.write_text("train: {steps: 0}\n")
    with pytest.raises(ParamsError, match=r"(?s)params.yaml: 1 problem\(s\).*train.steps: Input should be greater than or equal to 1"):
        load_params(path)


# ------------------------------------------------------------------- round trip (hypothesis)
# Fields whose validators need more than their type and bounds: valid values drawn directly.
FOUR_N1 = st.integers(0, 40).map(lambda n: 4 * n + 1)
SIDE16 = st.integers(1, 120).map(lambda n: 16 * n)
SPECIAL = {
    ("BucketConfig", "num_frames"): st.lists(FOUR_N1, min_size=1, max_size=4),
    ("BucketConfig", "resolutions"): st.lists(SIDE16, min_size=1, max_size=4),
    ("SampleConfig", "num_frames"): FOUR_N1,
    ("SampleConfig", "width"): SIDE16,
    ("SampleConfig", "height"): SIDE16,
    ("JobConfig", "device"): st.sampled_from(["auto", "cpu", "cuda", "cuda:3"]),
    ("ExportConfig", "step"): st.one_of(st.sampled_from(["best", "last"]), st.integers(0, 10**6).map(str)),
    ("NetworkConfig", "target_modules"): st.lists(st.sampled_from(["to_q", "to_k", "ffn.net.2"]), min_size=1),
    ("TrainConfig", "betas"): st.tuples(*[st.floats(0, 1, exclude_max=True)] * 2),
}
# NEL (U+0085) is left out: PyYAML folds it inside quoted scalars (test_nel_round_trip below).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x85"), max_size=12)


def _bounded(kind: type, metadata: list) -> st.SearchStrategy:
    lo = hi = None
    exclusive_lo = exclusive_hi = False
    for m in metadata:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, exclusive_lo = m.gt, True
        elif isinstance(m, Le):
            hi = m.le
        elif isinstance(m, Lt):
            hi, exclusive_hi = m.lt, True
    if kind is int:
        lo = None if lo is None else lo + exclusive_lo
        hi = None if hi is None else hi - exclusive_hi
        return st.integers(lo if lo is not None else -(10**6), hi if hi is not None else 10**6)
    return st.floats(lo if lo is not None else -1e6, hi if hi is not None else 1e6,
                     exclude_min=exclusive_lo, exclude_max=exclusive_hi, allow_nan=False)


def _for_type(ann: typing.Any, metadata: list) -> st.SearchStrategy:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[st.none() if a is type(None) else _for_type(a, metadata) for a in args])
    if origin is list:
        return st.lists(_for_type(args[0], []), max_size=3)
    if origin is dict:
        names = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
        return st.dictionaries(names, _for_type(args[1], []), min_size=1, max_size=2)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return section(ann)
    if ann is bool:
        return st.booleans()
    if ann in (int, float):
        return _bounded(ann, metadata)
    if ann is str:
        return TEXT
    raise TypeError(f"no strategy for {ann!r}: extend tests/test_params.py")


def section(model: type[BaseModel]) -> st.SearchStrategy[dict]:
    """Partial mappings of a section: any subset of its keys, each a value its type allows."""
    optional = {
        name: SPECIAL[model.__name__, name] if (model.__name__, name) in SPECIAL else _for_type(f.annotation, f.metadata)
        for name, f in model.model_fields.items()
    }
    return st.fixed_dictionaries({}, optional=optional)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=section(Params))
def test_dump_then_parse_is_identity(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank > 64 warns
        try:
            params = parse_params(data)
        except ParamsError:
            assume(False)  # cross-field rules (both experts off) reject some draws
        again = parse_params(yaml.safe_load(dump_params(params)))
    assert again == params
    assert dump_params(again) == dump_params(params)


def test_nel_round_trip():
    """A prompt pasted from cp1252 text can hold U+0085 ('...' decoded as Latin-1)."""
    params = parse_params({"sample": {"prompts": ["a dog waits\x85barks"]}})
    assert parse_params(yaml.safe_load(dump_params(params))) == params


def test_betas_must_be_below_one():
    msg = error_of({"train": {"betas": [0.9, 1.0]}})
    assert "train.betas: each beta must be in [0, 1); AdamW's default is [0.9, 0.999] (got [0.9, 1.0])" in msg
    assert parse_params({"train": {"betas": [0.8, 0.99]}}).train.betas == (0.8, 0.99)


def test_autocaption_off_survives_a_dvc_exp_rewrite_of_params_yaml(tmp_path):
    """`dvc exp run -S` rewrites params.yaml with ruamel (YAML 1.2), which writes `mode: off`
    unquoted; PyYAML's YAML 1.1 reads that as false. params.yaml is read as YAML 1.2, like DVC."""
    import yaml

    from wanlora.config import load_params

    text = "autocaption:\n  mode: off\ndatasets:\n  main:\n    flip_horizontal: true\n"
    assert yaml.safe_load(text)["autocaption"]["mode"] is False
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params.autocaption.mode == "off" and params.datasets["main"].flip_horizontal is True
