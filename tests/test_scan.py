"""The raw-file index: hashes, caption pairing, unsafe links, and raw data left untouched."""

import os
from pathlib import Path

from wanlora.config import parse_params
from wanlora.data.scan import run_stage
from wanlora.io import read_jsonl, sha256_file


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_scan_indexes_media_and_captions_and_reports_unsafe_links(tmp_path: Path):
    raw = tmp_path / "data/raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "a.mp4").write_bytes(b"video-a")
    (raw / "a.txt").write_text("a caption")
    (raw / "sub/b.png").write_bytes(b"png-b")
    (raw / "empty.mp4").write_bytes(b"")
    (raw / "notes.doc").write_bytes(b"x")
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"secret")
    os.symlink(outside, raw / "escape.mp4")
    os.symlink(raw / "loop1.mp4", raw / "loop2.mp4")
    os.symlink(raw / "loop2.mp4", raw / "loop1.mp4")
    before = _tree(raw)

    params = parse_params({})
    run_stage(params.datasets, tmp_path, tmp_path / "data/index")

    media = {r["id"]: r for r in read_jsonl(tmp_path / "data/index/media.jsonl")}
    assert sorted(media) == ["main/a.mp4", "main/empty.mp4", "main/sub/b.png"]
    assert media["main/a.mp4"]["sha256"] == sha256_file(raw / "a.mp4")
    caps = read_jsonl(tmp_path / "data/index/captions.jsonl")
    assert [(c["path"], c["media"]) for c in caps] == [("data/raw/a.txt", "data/raw/a.mp4")]

    import json
    problems = json.loads((tmp_path / "data/index/problems.json").read_text())["problems"]
    reasons = {Path(p["path"]).name: p["reason"] for p in problems}
    assert "outside the dataset folder" in reasons["escape.mp4"]
    assert "loop" in reasons["loop1.mp4"] and "loop" in reasons["loop2.mp4"]
    assert "unsupported file type" in reasons["notes.doc"]
    assert reasons["empty.mp4"].startswith("empty file")
    assert _tree(raw) == before


def test_scan_output_is_byte_stable(tmp_path: Path):
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    for i in range(5):
        (raw / f"c{i}.mp4").write_bytes(bytes([i]) * 10)
    params = parse_params({})
    run_stage(params.datasets, tmp_path, tmp_path / "out1")
    run_stage(params.datasets, tmp_path, tmp_path / "out2")
    for name in ("media.jsonl", "captions.jsonl", "problems.json"):
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()


def test_same_media_under_two_names_or_in_two_datasets_is_reported(tmp_path: Path):
    import json

    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/more").mkdir(parents=True)
    (tmp_path / "data/raw/a.mp4").write_bytes(b"clip-one")
    (tmp_path / "data/raw/a_copy.mp4").write_bytes(b"clip-one")
    (tmp_path / "data/more/a.mp4").write_bytes(b"clip-one")
    (tmp_path / "data/more/b.mp4").write_bytes(b"clip-two")
    (tmp_path / "data/more/e1.mp4").write_bytes(b"")
    (tmp_path / "data/more/e2.mp4").write_bytes(b"")  # empty files: reported as empty, not as copies
    params = parse_params({"datasets": {"main": {"folder": "data/raw"}, "more": {"folder": "data/more"}}})
    run_stage(params.datasets, tmp_path, tmp_path / "data/index")
    problems = json.loads((tmp_path / "data/index/problems.json").read_text())["problems"]
    copies = sorted((p["path"], p["reason"]) for p in problems if "same content" in p["reason"])
    digest = sha256_file(tmp_path / "data/raw/a.mp4")[:12]
    assert copies == [
        ("data/raw/a.mp4", f"same content as data/more/a.mp4 (sha256 {digest}): 3 copies train 3x as often as one clip"),
        ("data/raw/a_copy.mp4", f"same content as data/more/a.mp4 (sha256 {digest}): 3 copies train 3x as often as one clip"),
    ]
    assert sum("empty file" in p["reason"] for p in problems) == 2


def test_an_empty_dataset_stops_the_scan_with_the_fix(tmp_path: Path):
    """Not 30 "is empty" warnings and a text encoder load before train finds nothing to train."""
    import pytest

    from wanlora.data.scan import EmptyDataset

    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    (raw / "notes.txt").write_text("a caption with no clip")
    with pytest.raises(EmptyDataset, match=r"dataset 'main': data/raw holds no clip or image \(1 other file\(s\)\), "
                                           r"so there is nothing to train\. Fix: copy your clips .* into data/raw, "
                                           r"then `dvc add data/raw` and `dvc repro`"):
        run_stage(parse_params({}).datasets, tmp_path, tmp_path / "data/index")
    assert not (tmp_path / "data/index").exists()


def test_a_missing_dataset_folder_stops_the_scan_with_the_fix(tmp_path: Path):
    """The first stage that reads the dataset folders says which one is missing (trim reads the index)."""
    import pytest

    with pytest.raises(FileNotFoundError, match=r"dataset 'main': folder .*nope does not exist; create it or fix "
                                                r"datasets\.main\.folder"):
        run_stage(parse_params({"datasets": {"main": {"folder": "nope"}}}).datasets, tmp_path, tmp_path / "data/index")


def test_stages_print_our_message_about_a_cut_video_without_ffmpegs_own_line(tmp_path: Path):
    import subprocess
    import sys

    from wanlora.media.synth import ClipSpec, make_clip

    make_clip(tmp_path / "full.mp4", ClipSpec(moving=24))
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    code = ("from wanlora.stages._common import run\nfrom wanlora.media.probe import probe\n"
            "def main():\n    try:\n        probe('cut.mp4')\n    except Exception as e:\n        print('ours:', e)\n"
            "run(main)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert "ours: incomplete MP4" in done.stdout, done.stdout + done.stderr
    assert "moov atom not found" not in done.stdout + done.stderr


def test_adding_a_missing_caption_changes_only_the_caption_index(tmp_path: Path):
    """The fix the captions report suggests must not rerun trim and bucket (they read media.jsonl)."""
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    (raw / "a.mp4").write_bytes(b"video-a")
    (raw / "b.mp4").write_bytes(b"video-b")
    (raw / "a.txt").write_text("a caption")
    params = parse_params({})
    run_stage(params.datasets, tmp_path, tmp_path / "before")
    (raw / "b.txt").write_text("the missing caption")
    run_stage(params.datasets, tmp_path, tmp_path / "after")
    assert (tmp_path / "before/media.jsonl").read_bytes() == (tmp_path / "after/media.jsonl").read_bytes()
    caps = read_jsonl(tmp_path / "after/captions.jsonl")
    assert [(c["path"], c["media"]) for c in caps] == [("data/raw/a.txt", "data/raw/a.mp4"),
                                                       ("data/raw/b.txt", "data/raw/b.mp4")]


def test_on_error_fail_stops_the_scan_listing_every_file_it_found_bad(tmp_path: Path):
    """With `on_error: fail` the first stage that sees a bad file stops (scan used to only warn, and
    every later stage ran); its report is written first, so the reason stays on disk."""
    import json

    import pytest

    from wanlora.report import InputError

    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    (raw / "a.mp4").write_bytes(b"video-a")
    (raw / "notes.gif").write_bytes(b"GIF89a")
    (raw / "empty.mp4").write_bytes(b"")
    params = parse_params({"datasets": {"main": {"on_error": "fail"}}})
    with pytest.raises(InputError, match=r"scan: 2 bad input\(s\), and on_error is 'fail':\n.*notes\.gif.*\n.*empty\.mp4"):
        run_stage(params.datasets, tmp_path, tmp_path / "data/index")
    assert json.loads((tmp_path / "data/index/problems.json").read_text())["count"] == 2
    run_stage(parse_params({}).datasets, tmp_path, tmp_path / "data/index")  # skip: reported, not fatal
