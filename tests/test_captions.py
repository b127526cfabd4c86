"""Captions stage: decoding, trigger rules, DOP variants, problems, and the skip-or-stop policy."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from wanlora.config import CaptionConfig, DatasetConfig, DopConfig, JobConfig
from wanlora.data.captions import (
    CaptionError,
    apply_trigger,
    build_caption,
    decode_caption,
    dop_variant,
    run_stage,
)
from wanlora.io import read_jsonl, sha256_text, write_jsonl
from wanlora.report import InputError


def words(text: str) -> int:
    """Token counter for tests: one token per whitespace-separated word."""
    return len(text.split())


def make_workspace(tmp_path: Path, files: dict[str, bytes | None], sampled: list[str] | None = None) -> Path:
    """data/raw with a media file per key (value: caption bytes, or None for no caption), clips.jsonl,
    samples.jsonl listing `sampled` stems (default: all)."""
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    clips, index = [], []
    for stem, caption in files.items():
        (raw / f"{stem}.mp4").write_bytes(b"video")
        if caption is not None:
            (raw / f"{stem}.txt").write_bytes(caption)
            index.append({"id": f"main/{stem}.txt", "dataset": "main", "path": f"data/raw/{stem}.txt",
                          "sha256": "", "media": f"data/raw/{stem}.mp4"})
        clips.append({"id": f"main/{stem}.mp4", "dataset": "main", "path": f"data/raw/{stem}.mp4", "status": "ok"})
    write_jsonl(tmp_path / "data/trimmed/clips.jsonl", clips)
    write_jsonl(tmp_path / "data/index/captions.jsonl", index)
    stems = list(files) if sampled is None else sampled
    write_jsonl(tmp_path / "data/buckets/samples.jsonl",
                [{"id": f"main/{s}.mp4#0", "clip_id": f"main/{s}.mp4", "dataset": "main"} for s in stems])
    return tmp_path


def run(ws: Path, trigger: str = "sks", dop_class: str = "person", **caption_kw) -> tuple[dict, list[dict]]:
    """Run the stage on workspace `ws`; return captions by id and the problem rows."""
    ds = DatasetConfig(folder="data/raw", captions=CaptionConfig(**caption_kw))
    run_stage(JobConfig(trigger_word=trigger), {"main": ds}, DopConfig(preservation_class=dop_class),
              ws / "data/trimmed/clips.jsonl", ws / "data/buckets/samples.jsonl", ws / "data/index/captions.jsonl", ws,
              ws / "data/captions", words)
    records = {r["id"]: r for r in read_jsonl(ws / "data/captions/captions.jsonl")}
    problems = json.loads((ws / "data/captions/problems.json").read_text())["problems"]
    return records, problems


def test_records_inject_trigger_and_hash_sources(tmp_path):
    ws = make_workspace(tmp_path, {"a": b"a  man\nwalking ", "b": b"[trigger] dancing", "c": b"unused"},
                        sampled=["a", "b"])
    records, problems = run(ws)
    assert set(records) == {"main/a.mp4", "main/b.mp4"}  # c has no sample
    a = records["main/a.mp4"]
    assert a == {
        "id": "main/a.mp4",
        "caption": "sks a man walking",
        "caption_dop": "person a man walking",
        "caption_sha256": sha256_text("sks a man walking"),
        "origin": "file",
        "source": "data/raw/a.txt",
        "source_sha256": hashlib.sha256(b"a  man\nwalking ").hexdigest(),
        "warnings": [],
    }
    assert records["main/b.mp4"]["caption"] == "sks dancing"
    assert records["main/b.mp4"]["caption_dop"] == "person dancing"
    assert problems == []


def test_trigger_positions():
    cfg = {"start": "sks a dog", "end": "a dog, sks", "none": "a dog"}
    for pos, want in cfg.items():
        assert apply_trigger("a dog", "sks", pos) == want
    assert apply_trigger("A dog runs.", "sks", "end") == "A dog runs. sks"
    assert apply_trigger("dog, park,", "sks", "end") == "dog, park, sks"
    # already present as a word: untouched; inside another word: not present
    assert apply_trigger("a sks dog", "sks", "start") == "a sks dog"
    assert apply_trigger("a sksy dog", "sks", "start") == "sks a sksy dog"
    # a placeholder glued to a word still counts as the trigger: no second copy
    assert apply_trigger("[trigger]man waves", "sks", "start") == "sksman waves"


def test_trigger_insertion_is_ai_toolkits():
    """toolkit/prompt_utils.py inject_trigger_into_prompt (called by dataloader_mixins
    CaptionProcessingDTOMixin.get_caption with add_if_not_present for training captions): "[name]"
    and "[trigger]" are both replaced by the trigger, and a caption without it becomes
    `trigger + " " + caption`, no comma."""
    assert apply_trigger("a red boat", "h4rb0r", "start") == "h4rb0r a red boat"
    assert apply_trigger("[name] sails past [trigger]", "h4rb0r", "start") == "h4rb0r sails past h4rb0r"
    assert apply_trigger("[name], at dusk", "h4rb0r", "end") == "h4rb0r, at dusk"
    assert apply_trigger("[[name]]", "name", "start") == "name"


def test_placeholder_never_survives_and_bracket_triggers_are_refused():
    assert apply_trigger("[[trigger]]", "trigger", "start") == "trigger"
    with pytest.raises(ValueError, match=r"job.trigger_word '\[x' contains square brackets"):
        apply_trigger("a dog", "[x", "start")


def test_dop_is_whole_word_case_sensitive_every_occurrence():
    assert dop_variant("sks and sksy, Sks, sks.", "sks", "person") == "person and sksy, Sks, person."


def test_default_caption_and_missing_caption(tmp_path):
    ws = make_workspace(tmp_path, {"a": None})
    records, problems = run(ws, default_caption="a [trigger] video")
    assert records["main/a.mp4"]["caption"] == "a sks video"
    assert records["main/a.mp4"]["source"] == "default"
    assert records["main/a.mp4"]["source_sha256"] == sha256_text("a [trigger] video")

    records, problems = run(ws)
    assert records == {}
    assert problems == [{
        "path": "data/raw/a.mp4", "stage": "captions", "reason": "no caption file (expected a.txt beside it)",
        "fix": "write a.txt, or set datasets.main.captions.default_caption",
    }]


def test_empty_and_whitespace_captions_are_problems(tmp_path):
    ws = make_workspace(tmp_path, {"a": b"", "b": b" \n\t "})
    records, problems = run(ws)
    assert records == {}
    assert [(p["path"], p["reason"]) for p in problems] == [
        ("data/raw/a.txt", "caption is empty"), ("data/raw/b.txt", "caption is empty")]
    assert problems[0]["fix"] == "write a caption, or set datasets.main.captions.default_caption (used for empty files)"


def test_empty_caption_file_falls_back_to_the_default_with_a_warning(tmp_path):
    """AI Toolkit (toolkit/dataloader_mixins.py, CaptionProcessingDTOMixin.load_caption) uses the dataset's
    default caption when a caption file is empty; so do we, and say so."""
    ws = make_workspace(tmp_path, {"a": b" \n", "b": b"a cat"})
    records, problems = run(ws, default_caption="a [trigger] video")
    assert problems == []
    a = records["main/a.mp4"]
    assert (a["caption"], a["source"], a["source_sha256"]) == ("a sks video", "default", sha256_text("a [trigger] video"))
    assert a["warnings"] == ["data/raw/a.txt is empty: used datasets.main.captions.default_caption"]
    assert records["main/b.mp4"]["caption"] == "sks a cat" and records["main/b.mp4"]["warnings"] == []


def test_encodings(tmp_path):
    text = "café [trigger] ünïcode"
    ws = make_workspace(tmp_path, {
        "u8bom": b"\xef\xbb\xbf" + text.encode("utf-8"),
        "u16le": b"\xff\xfe" + text.encode("utf-16-le"),
        "u16be": b"\xfe\xff" + text.encode("utf-16-be"),
        "latin": "café".encode("latin-1"),
        "u16nobom": text.encode("utf-16-le"),
    })
    records, problems = run(ws)
    for stem in ("u8bom", "u16le", "u16be"):
        assert records[f"main/{stem}.mp4"]["caption"] == "café sks ünïcode"
    assert "main/latin.mp4" not in records
    reasons = {p["path"]: p["reason"] for p in problems}
    assert reasons["data/raw/latin.txt"] == "not UTF-8 text (byte 0xe9 at offset 3)"
    assert reasons["data/raw/u16nobom.txt"] == "contains NUL bytes (UTF-16 saved without a byte-order mark?)"

    records, problems = run(ws, non_utf8="decode_latin1")
    latin = records["main/latin.mp4"]
    assert latin["caption"] == "sks café"
    assert latin["warnings"] == ["not UTF-8 (byte 0xe9 at offset 3); decoded as Latin-1"]


def test_bad_bom_is_a_problem():
    with pytest.raises(CaptionError, match="UTF-16 byte-order mark but is not valid UTF-16"):
        decode_caption(b"\xff\xfeab\xd8", "error")  # odd byte count


def test_too_long_and_only_trigger(tmp_path):
    ws = make_workspace(tmp_path, {"long": b"one two three four five", "bare": b"[trigger]"})
    records, problems = run(ws, max_tokens=5)
    assert problems[0]["path"] == "data/raw/long.txt"
    assert problems[0]["reason"] == "caption has 6 tokens, over the limit of 5"  # the trigger counts
    assert problems[0]["fix"].startswith("shorten it to at most 5 tokens")
    assert records["main/bare.mp4"]["caption"] == "sks"
    assert records["main/bare.mp4"]["warnings"] == [
        "caption is only the trigger word; describing the scene teaches the trigger better"]


def test_orphan_captions_reported(tmp_path):
    ws = make_workspace(tmp_path, {"a": b"a dog"})
    (ws / "data/raw/sub").mkdir()
    (ws / "data/raw/sub/lost.txt").write_text("a cat")
    (ws / "data/raw/.hidden").mkdir()
    (ws / "data/raw/.hidden/x.txt").write_text("ignored")
    index = read_jsonl(ws / "data/index/captions.jsonl")  # as the scan stage lists an orphan
    write_jsonl(ws / "data/index/captions.jsonl",
                index + [{"id": "main/sub/lost.txt", "dataset": "main", "path": "data/raw/sub/lost.txt", "sha256": "",
                          "media": None}])
    records, problems = run(ws)
    assert list(records) == ["main/a.mp4"]
    assert [(p["path"], p["reason"]) for p in problems] == [
        ("data/raw/sub/lost.txt", "caption file with no clip or image of the same name")]


def test_on_error_fail_stops_after_writing_report(tmp_path):
    ws = make_workspace(tmp_path, {"a": b"", "b": b"fine"})
    ds = DatasetConfig(folder="data/raw", on_error="fail")
    with pytest.raises(InputError, match=r"(?s)captions: 1 bad input\(s\).*data/raw/a.txt: caption is empty"):
        run_stage(JobConfig(), {"main": ds}, DopConfig(), ws / "data/trimmed/clips.jsonl",
                  ws / "data/buckets/samples.jsonl", ws / "data/index/captions.jsonl", ws, ws / "data/captions", words)
    assert json.loads((ws / "data/captions/problems.json").read_text())["count"] == 1
    assert len(read_jsonl(ws / "data/captions/captions.jsonl")) == 1


def test_inconsistent_manifests_name_both_files(tmp_path):
    ws = make_workspace(tmp_path, {"a": b"x"}, sampled=["a", "ghost"])
    with pytest.raises(ValueError, match="sample of clip 'main/ghost.mp4'.*rerun `dvc repro`"):
        run(ws)


# ------------------------------------------------------------------------------- properties
TRIGGER = st.one_of(st.just("trigger"), st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True))
CLASS = st.from_regex(r"[a-z]{1,8}( [a-z]{1,8})?", fullmatch=True)
PIECES = list("ab sS,.!\n\t[]_é") + ["[trigger]", "[trigger", "[name]"]


@st.composite
def caption_and_trigger(draw) -> tuple[str, str]:
    """A trigger, and text built of pieces that include the trigger and its near misses."""
    trigger = draw(TRIGGER)
    pieces = PIECES + [trigger, trigger + "x", trigger.upper()]
    return "".join(draw(st.lists(st.sampled_from(pieces), max_size=20))), trigger


def is_word(trigger: str, text: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)", text) is not None


@given(pair=caption_and_trigger(), position=st.sampled_from(["start", "end", "none"]), cls=CLASS)
def test_caption_properties(pair, position, cls):
    raw, trigger = pair
    assume(not is_word(trigger, cls))
    cfg = CaptionConfig(trigger_position=position)
    try:
        cap = build_caption(raw, trigger, cfg, cls, words)
    except CaptionError as err:
        # only empty captions may fail here (the limit is far above 40 characters)
        assert str(err).startswith("caption is empty")
        assert not " ".join(raw.replace("[trigger]", "").replace("[name]", "").split())
        return
    text = cap.text
    assert "[trigger]" not in text and "[name]" not in text
    assert text == text.strip() and "  " not in text and "\n" not in text
    present = "[trigger]" in raw or "[name]" in raw or is_word(trigger, " ".join(raw.split()))
    if present:
        assert trigger in text
    elif position == "start":
        assert text.startswith(trigger + " ") or text == trigger
    elif position == "end":
        assert text.endswith(", " + trigger) or text.endswith(". " + trigger) or text.endswith("? " + trigger) \
            or text.endswith("! " + trigger) or text == trigger
    else:
        assert text == " ".join(raw.split())
    assert not is_word(trigger, cap.dop)
    assert cap.dop == text if not is_word(trigger, text) else cls in cap.dop


def test_empty_trigger_uses_captions_as_written():
    """An AI Toolkit import without a trigger word: [trigger] vanishes, nothing is injected."""
    cfg = CaptionConfig()
    cap = build_caption("[trigger] dog  runs", "", cfg, "person", words)
    assert (cap.text, cap.dop, cap.warnings) == ("dog runs", "dog runs", [])
    with pytest.raises(CaptionError, match="caption is empty once the trigger placeholder is replaced"):
        build_caption("[trigger]", "", cfg, "person", words)


def test_class_containing_trigger_is_flagged(tmp_path, capsys):
    ws = make_workspace(tmp_path, {"a": b"a dog"})
    records, _ = run(ws, dop_class="sks [person]")
    assert records["main/a.mp4"]["caption_dop"] == "sks [person] a dog"
    err = " ".join(capsys.readouterr().err.split())
    assert "train.dop.preservation_class 'sks [person]' contains the trigger word 'sks'" in err


@given(raw=st.text(st.characters(blacklist_categories=("Cs",))), trigger=TRIGGER,
       position=st.sampled_from(["start", "end", "none"]))
def test_any_text_is_stripped_and_has_no_placeholder(raw, trigger, position):
    text = apply_trigger(raw, trigger, position)
    assert "[trigger]" not in text
    assert text == " ".join(text.split())
    if position != "none" and text:
        assert is_word(trigger, text) or "[trigger]" in raw
    assert not is_word(trigger, dop_variant(text, trigger, "person"))


def test_unload_text_encoder_captions_every_clip_with_the_trigger_alone(tmp_path):
    """AI Toolkit's unload_text_encoder: caption files are ignored, the trigger word is the caption."""
    from wanlora.config import parse_params
    from wanlora.data.captions import _clip_caption

    params = parse_params({"job": {"trigger_word": "zqx"}, "train": {"dop": {"preservation_class": "dog"}}})
    clip = {"id": "main/a.mp4", "dataset": "main", "path": "data/raw/a.mp4", "caption_path": None}
    record = _clip_caption(clip, params.datasets["main"], params.job, params.train.dop, tmp_path, len, True)
    assert (record["caption"], record["caption_dop"], record["source"]) == ("zqx", "dog", "trigger_only")


@pytest.mark.parametrize("where", ["absolute", "dotdot", "link"])
def test_caption_path_leaving_the_dataset_folder_is_refused(tmp_path, where):
    """The review's experiment: clips.jsonl swapped on a shared remote names `~/.netrc` as a
    caption; the captions stage copied its text into captions.jsonl, which is then pushed."""
    from wanlora.io import ManifestPathError

    secret = tmp_path / "home/.netrc"
    secret.parent.mkdir()
    secret.write_text("machine example.com login me password hunter2")
    ws = make_workspace(tmp_path / "ws", {"a": b"sks on a beach", "b": b"sks in a park"})
    index = read_jsonl(ws / "data/index/captions.jsonl")  # the scan stage's caption pairing
    if where == "link":  # a link inside the folder whose target is outside
        (ws / "data/raw/b.txt").unlink()
        (ws / "data/raw/b.txt").symlink_to(secret)
    else:
        index[1]["path"] = str(secret) if where == "absolute" else "data/raw/../../../home/.netrc"
    write_jsonl(ws / "data/index/captions.jsonl", index)
    with pytest.raises(ManifestPathError, match=r"caption of clip main/b.mp4: path .* lies outside its dataset "
                                                r"folder data/raw.*verify: true"):
        run(ws)
    out = ws / "data/captions/captions.jsonl"
    assert not out.exists() or "hunter2" not in out.read_text()
