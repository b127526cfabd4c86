"""The autocaption stage: captions for clips without one, from what will be trained, cached by
content, deterministic, bad output reported; and the captions stage's file > auto > default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wanlora.config import AutocaptionConfig, DatasetConfig, DopConfig, JobConfig
from wanlora.data import autocaption, captions
from wanlora.data.scan import run_stage as scan_stage
from wanlora.io import read_jsonl, write_jsonl
from wanlora.media.decode import read_frames
from wanlora.media.synth import ClipSpec, make_clip
from wanlora.media.trim import run_stage as trim_stage
from wanlora.models.captioner import Captioner, Decoding
from wanlora.models.loading import ModelError, captioner_identity, resolve_captioner
from wanlora.models.tiny import make_tiny_vlm

DATASETS = {"main": DatasetConfig(folder="data/raw")}
CFG = AutocaptionConfig(model="tiny", dtype="fp32", frames=3, frame_side=64, max_new_tokens=16,
                        repetition_penalty=1.3)


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return make_tiny_vlm(tmp_path_factory.mktemp("vlm") / "captioner", seed=4)


def _workspace(root: Path, clips: dict[str, tuple[ClipSpec, str | None]]) -> Path:
    raw = root / "data/raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, (spec, caption) in clips.items():
        make_clip(raw / name, spec)
        if caption is not None:
            (raw / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    _index(root)
    return root


def _index(root: Path) -> None:
    scan_stage(DATASETS, root, root / "data/index")
    trim_stage(DATASETS, root, root / "data/trimmed", index=root / "data/index/media.jsonl")


class Counting:
    """A describer that wraps another (or answers fixed text), counting calls and keeping the frames."""

    def __init__(self, inner=None, answer: str = ""):
        self.inner, self.answer, self.calls, self.closed = inner, answer, [], False

    def __call__(self, frames, instruction):
        self.calls.append(np.stack(frames))
        return self.inner(frames, instruction) if self.inner else self.answer

    def close(self):
        self.closed = True


def _run(ws: Path, describer, cfg: AutocaptionConfig = CFG, identity: str = "id0") -> None:
    autocaption.run_stage(ws / "data/trimmed/clips.jsonl", ws / "data/index/captions.jsonl", DATASETS, cfg, ws, ws / "data/autocaptions",
                          ws / "scratch/autocaptions", "tiny@main", identity, lambda: describer,
                          read_frames, words)


def _real(vlm: Path) -> Captioner:
    return Captioner(vlm, "fp32", "cpu", CFG.frame_side,
                     Decoding(CFG.max_new_tokens, CFG.num_beams, CFG.repetition_penalty))


TWO = {"with.mp4": (ClipSpec(64, 64, 16, 20, seed=1), "[trigger] walking"),
       "without.mp4": (ClipSpec(64, 64, 16, 20, seed=2), None)}


def test_tiny_vlm_captions_only_clips_without_a_file_and_reruns_byte_identical(tmp_path, vlm):
    ws = _workspace(tmp_path / "ws", TWO)
    captioner = Counting(_real(vlm))
    _run(ws, captioner, identity=captioner_identity(vlm))
    out = ws / "data/autocaptions"
    records = read_jsonl(out / "captions.jsonl")
    assert [r["id"] for r in records] == ["main/without.mp4"] and len(captioner.calls) == 1
    assert captioner.closed
    text = (out / "main/without.txt").read_text(encoding="utf-8")
    assert text.strip() == records[0]["caption"] and len(text.split()) >= 3
    assert not (out / "main/with.txt").exists() and not (ws / "data/raw/without.txt").exists()
    first = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    # Nothing cached, a fresh model load: greedy decoding gives the same bytes.
    import shutil
    shutil.rmtree(ws / "scratch"), shutil.rmtree(out)
    again = Counting(_real(vlm))
    _run(ws, again, identity=captioner_identity(vlm))
    assert len(again.calls) == 1
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == first


def test_frames_come_from_the_kept_cropped_range(tmp_path):
    """8 black intro frames and 12-pixel bars: the captioner sees neither."""
    ws = _workspace(tmp_path / "ws", {"c.mp4": (ClipSpec(64, 64, 16, 24, intro="black", intro_frames=8,
                                                         bars=(0, 12), seed=3), None)})
    fake = Counting(answer="[trigger] a figure moving across a textured wall")
    _run(ws, fake)
    (frames,) = fake.calls
    assert frames.shape == (3, 40, 64, 3)
    assert frames.reshape(3, -1).mean(axis=1).min() > 30, "a black intro frame reached the captioner"
    record = read_jsonl(ws / "data/autocaptions/captions.jsonl")[0]
    assert record["keep_start"] == 8 and all(8 <= f < record["keep_end"] for f in record["frames"])
    assert record["crop"] == [0, 12, 64, 40]


def test_adding_one_clip_captions_only_that_clip_and_mode_all_off(tmp_path, vlm):
    """The tiny VLM behind a call counter: each call is one clip the store did not hold."""
    ws = _workspace(tmp_path / "ws", TWO)
    fake = Counting(_real(vlm))
    _run(ws, fake, identity=captioner_identity(vlm))
    first = (ws / "data/autocaptions/main/without.txt").read_bytes()
    assert len(fake.calls) == 1
    make_clip(ws / "data/raw/new.mp4", ClipSpec(64, 64, 16, 20, seed=9))
    _index(ws)
    _run(ws, fake, identity=captioner_identity(vlm))
    assert len(fake.calls) == 1 + 1
    ids = [r["id"] for r in read_jsonl(ws / "data/autocaptions/captions.jsonl")]
    assert ids == ["main/new.mp4", "main/without.mp4"]
    assert (ws / "data/autocaptions/main/without.txt").read_bytes() == first  # from the store
    assert (ws / "data/autocaptions/main/new.txt").is_file()

    _run(ws, fake, AutocaptionConfig(**{**CFG.model_dump(), "mode": "all"}), identity=captioner_identity(vlm))
    assert len(fake.calls) == 2 + 1  # only with.mp4 is new to the store
    _run(ws, fake, AutocaptionConfig(**{**CFG.model_dump(), "mode": "off"}), identity=captioner_identity(vlm))
    assert read_jsonl(ws / "data/autocaptions/captions.jsonl") == []
    # A new prompt is a new key: both clips without a file are captioned again.
    _run(ws, fake, AutocaptionConfig(**{**CFG.model_dump(), "prompt": "Describe the look."}),
         identity=captioner_identity(vlm))
    assert len(fake.calls) == 3 + 2


@pytest.mark.parametrize("answer, reason", [
    ("", "empty"),
    ("I'm sorry, but I can't describe people in videos.", "refused"),
    ("a man walking a man walking a man walking down the street", "repeats itself"),
    (" ".join(f"w{i}" for i in range(600)), "600 tokens, over the text encoder's 512"),
])
def test_bad_output_is_reported_and_not_trained(tmp_path, answer, reason):
    ws = _workspace(tmp_path / "ws", {"without.mp4": TWO["without.mp4"]})
    _run(ws, Counting(answer=answer))
    out = ws / "data/autocaptions"
    (record,) = read_jsonl(out / "captions.jsonl")
    assert record["status"] == "bad" and reason in record["reason"]
    (problem,) = json.loads((out / "problems.json").read_text())["problems"]
    assert problem["path"] == "data/raw/without.mp4" and reason in problem["reason"]
    assert "without.txt" in problem["fix"] and problem["stage"] == "autocaption"
    assert not (out / "main/without.txt").exists()
    # The captions stage falls back to the default caption, never the bad text.
    write_jsonl(ws / "samples.jsonl", [{"id": "s", "clip_id": "main/without.mp4"}])
    ds = {"main": DatasetConfig(folder="data/raw", captions={"default_caption": "a clip"})}
    captions.run_stage(JobConfig(trigger_word="sks"), ds, DopConfig(), ws / "data/trimmed/clips.jsonl",
                       ws / "samples.jsonl", ws / "data/index/captions.jsonl", ws, ws / "data/captions", words,
                       autocaptions=out / "captions.jsonl")
    (cap,) = read_jsonl(ws / "data/captions/captions.jsonl")
    assert (cap["origin"], cap["caption"]) == ("default", "sks a clip")


def test_good_captions_pass_the_checks():
    for text in ("[trigger] in a red coat walks through a park, medium shot, soft light",
                 "orbit 180 around a castle, slow and steady, the camera circles left to right"):
        assert autocaption.caption_problem(text, words, 512) is None


def test_precedence_file_then_auto_then_default(tmp_path):
    clips = {"file.mp4": (ClipSpec(64, 64, 16, 20, seed=1), "[trigger] from the file"),
             "auto.mp4": (ClipSpec(64, 64, 16, 20, seed=2), None),
             "default.mp4": (ClipSpec(64, 64, 16, 20, seed=3), None)}
    ws = _workspace(tmp_path / "ws", clips)
    # mode all captions every clip (in id order: auto, default, file); the refusal must not be used.
    answers = iter(["an auto caption of the first clip", "I cannot help with that",
                    "auto text the file clip never uses"])

    class PerClip(Counting):
        def __call__(self, frames, instruction):
            super().__call__(frames, instruction)
            return next(answers)

    _run(ws, PerClip(), AutocaptionConfig(**{**CFG.model_dump(), "mode": "all"}))
    auto = {r["id"]: r for r in read_jsonl(ws / "data/autocaptions/captions.jsonl")}
    assert auto["main/default.mp4"]["status"] == "bad" and auto["main/file.mp4"]["status"] == "ok"
    write_jsonl(ws / "samples.jsonl", [{"id": c, "clip_id": f"main/{c}"} for c in clips])
    ds = {"main": DatasetConfig(folder="data/raw", captions={"default_caption": "a default clip"})}
    captions.run_stage(JobConfig(trigger_word="sks"), ds, DopConfig(), ws / "data/trimmed/clips.jsonl",
                       ws / "samples.jsonl", ws / "data/index/captions.jsonl", ws, ws / "data/captions", words,
                       autocaptions=ws / "data/autocaptions/captions.jsonl")
    got = {r["id"]: r for r in read_jsonl(ws / "data/captions/captions.jsonl")}
    assert (got["main/file.mp4"]["origin"], got["main/file.mp4"]["caption"]) == ("file", "sks from the file")
    assert got["main/file.mp4"]["source"] == "data/raw/file.txt"
    assert got["main/auto.mp4"]["origin"] == "auto"
    assert got["main/auto.mp4"]["caption"] == "sks " + auto["main/auto.mp4"]["caption"]
    assert got["main/auto.mp4"]["source"] == "data/autocaptions/main/auto.txt"
    assert (got["main/default.mp4"]["origin"], got["main/default.mp4"]["caption"]) == ("default", "sks a default clip")


def test_captioner_loading_refuses_pickles_and_other_models(tmp_path, vlm):
    assert resolve_captioner(str(vlm)) == vlm
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (pickled / f).write_bytes((vlm / f).read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="pickle.*safetensors only"):
        resolve_captioner(str(pickled))
    (pickled / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ModelError, match="model_type 'llava'"):
        resolve_captioner(str(pickled))
    with pytest.raises(ModelError, match="autocaption.mode: off"):
        resolve_captioner("not a folder")


def test_captioner_hub_id_offline_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf/hub"))
    offline = r"Qwen/Qwen3-VL-8B-Instruct@main: not in the local hub cache.*hf download.*set autocaption.model"
    with pytest.raises(ModelError, match=offline):
        resolve_captioner("Qwen/Qwen3-VL-8B-Instruct", "main")


def test_frame_indices_spread_over_the_kept_range():
    assert autocaption.frame_indices(8, 32, 3) == [12, 20, 28]
    assert autocaption.frame_indices(0, 1, 6) == [0]  # an image
