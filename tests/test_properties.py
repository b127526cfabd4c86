"""Property tests the caption and params suites do not cover yet (no twins of theirs):

captions - decoding arbitrary bytes only ever raises CaptionError; every Unicode text saved the
ways editors save it (UTF-8, UTF-8 with BOM, UTF-16 LE/BE with BOM, UTF-32) decodes back exactly;
Latin-1 mode never fails without a BOM; building a caption from its own output changes nothing
(no double trigger), and whitespace variants of one caption hash the same.
params - a wrong-typed value or an unknown key at any leaf of the schema is a ParamsError that
names that leaf's dotted path (never another exception); bucket frame lists are accepted exactly
when every count is 4n+1.
"""

from __future__ import annotations

import warnings

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from wanlora.config import CaptionConfig, Params, ParamsError, parse_params
from wanlora.data.captions import CaptionError, build_caption, decode_caption, normalize_whitespace
from wanlora.io import sha256_text

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
TRIGGER = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)


def words(text: str) -> int:
    return len(text.split())


@given(data=st.binary(max_size=80), mode=st.sampled_from(["error", "decode_latin1"]))
def test_decoding_any_bytes_raises_only_caption_errors(data, mode):
    bom = data.startswith((b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf", b"\x00\x00\xfe\xff"))
    try:
        text, notes = decode_caption(data, mode)
    except CaptionError as err:
        assert err.fix and str(err)
        if mode == "decode_latin1" and not bom:
            assert b"\x00" in data  # only NUL bytes (UTF-16 without a BOM) may stop Latin-1 mode
        return
    assert isinstance(text, str)
    if not bom:
        assert text == data.decode("utf-8" if not notes else "latin-1")


@given(text=TEXT, codec=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]))
def test_editor_encodings_round_trip(text, codec):
    data = text.encode(codec)
    if codec in ("utf-16-le", "utf-16-be"):
        data = ("\ufeff" + text).encode(codec)  # Notepad's 'Unicode' / 'Unicode big endian'
    # NUL never belongs in a caption, and UTF-16 text starting with one reads as a UTF-32 BOM
    assume("\x00" not in text and not text.startswith("\ufeff"))
    decoded, notes = decode_caption(data, "error")
    assert decoded == text and notes == []


@given(raw=TEXT, trigger=TRIGGER, position=st.sampled_from(["start", "end", "none"]))
def test_building_a_caption_twice_changes_nothing(raw, trigger, position):
    cfg = CaptionConfig(trigger_position=position)
    try:
        once = build_caption(raw, trigger, cfg, "person", words)
    except CaptionError:
        return
    twice = build_caption(once.text, trigger, cfg, "person", words)
    assert twice.text == once.text and twice.dop == once.dop


@given(raw=TEXT, spaces=st.lists(st.sampled_from([" ", "  ", "\t", "\n", "\r\n"]), min_size=1, max_size=6))
def test_whitespace_variants_hash_the_same(raw, spaces):
    tokens = raw.split()
    assume(tokens)
    variant = spaces[0] + "".join(t + spaces[i % len(spaces)] for i, t in enumerate(tokens))
    assert sha256_text(normalize_whitespace(variant)) == sha256_text(normalize_whitespace(raw))


# ----------------------------------------------------------------------------------- params
def leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """(path, annotation) of every scalar leaf of the schema (nested sections expanded)."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += leaves(ann, (*prefix, name))
        else:
            out.append(((*prefix, name), ann))
    return out


LEAVES = [(path, ann) for path, ann in leaves(Params) if ann in (int, float, bool)]
SECTIONS = [path for path, _ in leaves(Params)]


def nest(path: tuple[str, ...], value) -> dict:
    data: dict = {}
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return data


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(leaf=st.sampled_from(LEAVES), bad=st.sampled_from([{"a": 1}, [1, 2], "not a number", None]))
def test_a_wrong_type_at_any_numeric_leaf_names_that_leaf(leaf, bad):
    path, ann = leaf
    assume(not (ann is bool and bad is None))
    with pytest.raises(ParamsError) as err:
        parse_params(nest(path, bad), "params.yaml")
    assert ".".join(path) in str(err.value) and str(err.value).startswith("params.yaml:")


@settings(max_examples=60, deadline=None)
@given(where=st.sampled_from(SECTIONS), key=st.from_regex(r"[a-z]{3,10}_[a-z]{2,6}", fullmatch=True))
def test_an_unknown_key_in_any_section_is_named(where, key):
    section = where[:-1]
    known = {name for name, _ in [(p[len(section)], 0) for p, _ in leaves(Params) if p[: len(section)] == section]}
    assume(key not in known)
    if not section:
        data = {key: 1}
    else:
        data = nest((*section, key), 1)
    with pytest.raises(ParamsError) as err:
        parse_params(data)
    assert ".".join((*section, key)) in str(err.value) and "unknown key" in str(err.value)


@settings(max_examples=80, deadline=None)
@given(frames=st.lists(st.integers(-3, 130), min_size=1, max_size=4))
def test_bucket_frames_accepted_exactly_when_all_are_4n_plus_1(frames):
    ok = all(n >= 1 and (n - 1) % 4 == 0 for n in frames)
    data = {"datasets": {"main": {"bucket": {"num_frames": frames}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            params = parse_params(data)
        except ParamsError as err:
            assert not ok, err
            assert "datasets.main.bucket.num_frames" in str(err) and "4n+1" in str(err)
            return
    assert ok and params.datasets["main"].bucket.num_frames == sorted(set(frames))
