"""The held-out split: whole clips, seeded, a fifth at most, validation datasets, labelled fallback."""

from __future__ import annotations

import pytest

from wanlora.config import ParamsError, parse_params
from wanlora.data.split import choose_split


def _samples(clips: dict[str, int], dataset: str = "main", flip: bool = False) -> list[dict]:
    """`windows` samples per clip (ids clip#k, and clip#kf flipped copies with `flip`)."""
    out = []
    for clip, windows in clips.items():
        for k in range(windows):
            out.append({"id": f"{dataset}/{clip}#{k}", "clip_id": f"{dataset}/{clip}", "dataset": dataset})
            if flip:
                out.append({"id": f"{dataset}/{clip}#{k}f", "clip_id": f"{dataset}/{clip}", "dataset": dataset,
                            "flip": True})
    return out


def _params(**sample):
    return parse_params({"job": {"seed": 7}, "sample": sample})


def test_whole_clips_are_held_out_by_a_seeded_choice():
    samples = _samples({f"c{i:02d}.mp4": 12 for i in range(20)}, flip=True)
    captioned = {s["clip_id"] for s in samples}
    split = choose_split(samples, captioned, _params(validation_clips=3))
    assert split["basis"] == "held_out" and len(split["held_out_clips"]) == 3
    held = set(split["held_out_clips"])
    # one scored sample per clip: its first unflipped window (#0, not #10 or #0f)
    assert split["validation_samples"] == [f"{c}#0" for c in split["held_out_clips"]]
    # as many training clips beside them, never one of the held-out ones
    train = {s.split("#")[0] for s in split["training_samples"]}
    assert len(train) == 3 and not train & held
    # seeded, order-independent, and another seed picks other clips
    assert choose_split(list(reversed(samples)), captioned, _params(validation_clips=3)) == split
    other = choose_split(samples, captioned, parse_params({"job": {"seed": 8}, "sample": {"validation_clips": 3}}))
    assert set(other["held_out_clips"]) != held
    assert "3 of 20 clip(s) held out" in split["reason"]


def test_at_most_a_fifth_and_too_few_clips_fall_back_to_a_labelled_training_loss():
    six = _samples({f"c{i}.mp4": 2 for i in range(6)})
    split = choose_split(six, {s["clip_id"] for s in six}, _params(validation_clips=3))
    assert len(split["held_out_clips"]) == 1 and "not the 3 asked for" in split["reason"]
    four = _samples({f"c{i}.mp4": 2 for i in range(4)})
    split = choose_split(four, {s["clip_id"] for s in four}, _params(validation_clips=2))
    assert split["basis"] == "training_clips" and split["held_out_clips"] == []
    assert len(split["training_samples"]) == 2 and "loss is measured on training clips" in split["reason"]
    none = choose_split(six, {s["clip_id"] for s in six}, _params(validation_clips=0))
    assert none["basis"] == "none" and none["training_samples"] == [] and none["validation_samples"] == []


def test_uncaptioned_clips_are_never_chosen():
    samples = _samples({f"c{i}.mp4": 1 for i in range(10)})
    captioned = {f"main/c{i}.mp4" for i in range(10) if i % 2}
    split = choose_split(samples, captioned, _params(validation_clips=1))
    assert all(int(c[6]) % 2 for c in split["held_out_clips"] + split["training_samples"])


def test_a_validation_dataset_is_held_out_whole_and_nothing_else_is():
    params = parse_params({"datasets": {"main": {"folder": "data/raw"},
                                        "val": {"folder": "data/val", "role": "validation"}},
                           "sample": {"validation_clips": 2}})
    samples = _samples({f"c{i}.mp4": 2 for i in range(10)}) + _samples({"v0.mp4": 3, "v1.mp4": 1}, "val")
    split = choose_split(samples, {s["clip_id"] for s in samples}, params)
    assert split["held_out_clips"] == ["val/v0.mp4", "val/v1.mp4"]
    assert split["validation_samples"] == ["val/v0.mp4#0", "val/v1.mp4#0"]
    assert all(s.startswith("main/") for s in split["training_samples"]) and len(split["training_samples"]) == 2
    assert "validation dataset(s) val" in split["reason"]


def test_a_validation_dataset_must_be_cached():
    with pytest.raises(ParamsError, match="validation dataset is scored from the latent cache"):
        parse_params({"datasets": {"v": {"role": "validation", "cache_latents": False}}})
