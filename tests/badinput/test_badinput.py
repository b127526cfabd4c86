"""Every case of the bad-input corpus gets the outcome it is owed by the data stages (run in-process).

The whole-pipeline run of the same corpus through `dvc repro` is in test_badinput_pipeline.py;
this file checks each case's reason precisely and fast, and the cases DVC itself cannot carry
(symlink loops and links out of the folder).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from badinput_corpus import STOP_CASES, TRIGGER, Case, write_pickle_bombs, write_raw_corpus

from wanlora.config import ParamsError, load_params
from wanlora.data import buckets, captions, scan
from wanlora.demo import demo_params
from wanlora.export.formats import LoraFormatError
from wanlora.export.imports import import_to_file
from wanlora.io import atomic_write_yaml, read_jsonl, sha256_file
from wanlora.media import trim
from wanlora.media.decode import read_frames
from wanlora.report import InputError

REPORTS = ("data/index/problems.json", "data/trimmed/problems.json", "data/buckets/report.json",
           "data/captions/problems.json")


def raw_state(raw: Path) -> dict[str, str]:
    """Each entry of the raw folder: file hash, or the link target for links (never followed)."""
    return {p.name: f"link:{os.readlink(p)}" if p.is_symlink() else sha256_file(p) for p in sorted(raw.iterdir())}


def reported(ws: Path) -> dict[str, list[str]]:
    """File name -> every reason any stage's report gives for it (captions by their clip's name too)."""
    out: dict[str, list[str]] = {}
    for rel in REPORTS:
        for p in json.loads((ws / rel).read_text(encoding="utf-8"))["problems"]:
            out.setdefault(Path(p["path"]).name, []).append(f"{p['reason']} | fix: {p['fix']}")
    return out


def run_data_stages(ws: Path, params, count_tokens=lambda s: len(s.split())) -> None:
    scan.run_stage(params.datasets, ws, ws / "data/index")
    trim.run_stage(params.datasets, ws, ws / "data/trimmed", index=ws / "data/index/media.jsonl")
    buckets.run_stage(params.datasets, ws / "data/trimmed/clips.jsonl", ws / "data/buckets")
    captions.run_stage(job=params.job, datasets=params.datasets, dop=params.train.dop,
                       clips_manifest=ws / "data/trimmed/clips.jsonl",
                       samples_manifest=ws / "data/buckets/samples.jsonl",
                       caption_index=ws / "data/index/captions.jsonl", workspace=ws,
                       out_dir=ws / "data/captions", count_tokens=count_tokens)


def corpus_params(**bucket):
    params = demo_params(4)
    params.datasets["main"].bucket.windows_per_clip = 1
    for k, v in bucket.items():
        setattr(params.datasets["main"].bucket, k, v)
    return params


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> tuple[Path, list[Case], dict[str, str]]:
    ws = tmp_path_factory.mktemp("badinput") / "ws"
    cases = write_raw_corpus(ws / "data/raw", ws.parent / "outside")
    before = raw_state(ws / "data/raw")
    run_data_stages(ws, corpus_params())
    return ws, cases, before


def test_corpus_has_at_least_30_cases_with_distinct_names(staged):
    _, cases, _ = staged
    names = [c.name for c in cases] + [c.name for c in STOP_CASES]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert {c.expect for c in cases} == {"skip", "train", "warn", "report"}


def test_every_case_gets_its_outcome(staged):
    """One pass over all cases, so a failure lists every case that went wrong at once."""
    ws, cases, _ = staged
    problems = reported(ws)
    trained = {r["id"].split("/", 1)[1]: r for r in read_jsonl(ws / "data/captions/captions.jsonl")}
    wrong = []
    for case in cases:
        stem = Path(case.name).stem
        reasons = problems.get(case.name, []) + problems.get(f"{stem}.txt", [])
        if case.expect == "skip":
            ok = case.name not in trained and any(case.match in r.lower() for r in reasons)
        elif case.expect == "report":
            ok = case.name in trained and any(case.match in r for r in reasons)
        else:
            ok = case.name in trained and not reasons
            if case.expect == "warn":
                ok = ok and any(case.match in w for w in trained[case.name]["warnings"])
        if not ok:
            wrong.append(f"{case.name} ({case.what}): expected {case.expect} '{case.match}', "
                         f"got reasons={reasons} trained={case.name in trained}")
    assert not wrong, "\n".join(wrong)


def test_reports_name_a_fix_and_stages_never_touch_raw(staged):
    ws, cases, before = staged
    for reasons in reported(ws).values():
        assert all(r.split("| fix: ")[1].strip() for r in reasons)
        assert not any("<name>" in r for r in reasons), reasons  # fixes name the dataset's real key
    assert raw_state(ws / "data/raw") == before


def test_awkward_sources_are_read_as_displayed(staged):
    ws, _, _ = staged
    clips = {r["id"]: r for r in read_jsonl(ws / "data/trimmed/clips.jsonl")}
    assert (clips["main/rotated.mp4"]["width"], clips["main/rotated.mp4"]["height"]) == (64, 96)
    assert clips["main/rotated.mp4"]["rotation"] in (90, 270)
    assert (clips["main/huge_8k.mkv"]["width"], clips["main/huge_8k.mkv"]["height"]) == (7680, 4320)
    assert (clips["main/odd_dims.mp4"]["width"], clips["main/odd_dims.mp4"]["height"]) == (67, 65)
    assert clips["main/cmyk.jpg"]["kind"] == "image"
    samples = read_jsonl(ws / "data/buckets/samples.jsonl")
    assert all(s["width"] % 16 == 0 and s["height"] % 16 == 0 and (s["num_frames"] - 1) % 4 == 0 for s in samples)
    # twins: two ids, one caption file claimed by both
    caps = {r["id"]: r for r in read_jsonl(ws / "data/captions/captions.jsonl")}
    assert caps["main/twin.mp4"]["caption"] == caps["main/twin.mov"]["caption"] == f"{TRIGGER} a twin clip"
    assert caps["main/cap_utf16.mp4"]["caption"] == f"{TRIGGER} na\u00efve walk"


def test_every_sampled_frame_of_an_awkward_clip_decodes(staged):
    """Found by the pipeline run: a variable-frame-rate clip passed trim and bucket, then its
    windows failed in latent_cache ("frames [7, 9, 11] cannot be decoded"): slots with no frame of
    their own now show the frame before, as a player does."""
    ws, _, _ = staged
    for s in read_jsonl(ws / "data/buckets/samples.jsonl"):
        frames = read_frames(ws / s["path"], s["frame_indices"])
        assert frames.shape[0] == len(s["frame_indices"]) and frames.dtype.name == "uint8", s["id"]


def test_with_a_still_bucket_short_clips_train_as_stills(staged, tmp_path):
    ws, _, _ = staged
    params = corpus_params(num_frames=[1, 9])
    buckets.run_stage(params.datasets, ws / "data/trimmed/clips.jsonl", tmp_path)
    bucket_of = {s["clip_id"]: s["bucket"] for s in read_jsonl(tmp_path / "samples.jsonl")}
    assert bucket_of["main/one_frame.mp4"] == bucket_of["main/short.mp4"] == "64x64x1"
    assert bucket_of["main/huge_8k.mkv"] == "80x48x1"  # the allowed aspect nearest 16:9 at a 64x64 area
    assert bucket_of["main/ok_plain.mp4"] == "64x64x9"
    assert json.loads((tmp_path / "report.json").read_text())["count"] == 0


def test_on_error_fail_stops_and_lists_every_bad_file(staged, tmp_path):
    ws, cases, _ = staged
    params = corpus_params()
    params.datasets["main"].on_error = "fail"
    # scan stops on what the folder walk finds (links, empty files), trim on what decoding finds
    messages, count = [], 0
    for out, stage in ((tmp_path / "index", lambda out: scan.run_stage(params.datasets, ws, out)),
                       (tmp_path / "trimmed", lambda out: trim.run_stage(params.datasets, ws, out,
                                                                         index=ws / "data/index/media.jsonl"))):
        with pytest.raises(InputError) as err:
            stage(out)
        messages.append(str(err.value))
        count += json.loads((out / "problems.json").read_text())["count"]
    msg = "\n".join(messages)
    for case in cases:
        if case.expect == "skip" and not case.name.startswith("cap_") and case.match != "too short":
            assert case.name in msg, f"{case.name} missing from:\n{msg}"
    assert "on_error: skip" in msg
    assert count >= 12  # reports written before stopping


# ------------------------------------------------------------------ inputs that stop commands
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wanlora.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_pickled_loras_are_refused_without_unpickling(tmp_path: Path):
    """The CLI's audit (one process for all three files) and the import library call."""
    marker = tmp_path / "UNPICKLED"
    files = write_pickle_bombs(tmp_path / "in", marker)
    script = ("import sys\nfrom wanlora.cli import main\nfor f in sys.argv[1:]:\n"
              "    sys.argv = ['wanlora', 'audit', f]\n    try:\n        main()\n"
              "    except SystemExit as e:\n        print('EXIT', e.code)\n")
    out = subprocess.run([sys.executable, "-c", script, *map(str, files.values())], cwd=tmp_path,
                         capture_output=True, text=True)
    text = "".join((out.stdout + out.stderr).split())  # rich wraps long paths mid-word
    codes = re.findall(r"EXIT(\d+)", text)
    assert len(codes) == 3 and "0" not in codes and "Traceback" not in text, text
    for path in files.values():
        assert f"{path.name}:refused,'{path.suffix}'filesarePythonpickles" in text.replace(str(path.parent) + "/", ""), text
        with pytest.raises(LoraFormatError, match="pickles that can run code"):
            import_to_file(path, tmp_path / "out.safetensors", {})
    assert not marker.exists(), "a pickle was unpickled"
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_params_files_name_the_file_and_the_key(tmp_path: Path):
    base = demo_params(4).model_dump(mode="json")
    edits = {
        "params_type": (("train", "steps"), "ten", "train.steps"),
        "params_negative": (("train", "steps"), -5, "train.steps"),
        "params_frames": (("datasets", "main", "bucket", "num_frames"), [1, 8], "use [9]"),
        "params_unknown": (("train", "learning_rate"), 1e-4, "did you mean"),
    }
    assert set(edits) == {c.name for c in STOP_CASES if c.name.startswith("params_")}
    for name, (keys, value, expect) in edits.items():
        data = json.loads(json.dumps(base))
        node = data
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        path = tmp_path / f"{name}.yaml"
        atomic_write_yaml(path, data)
        with pytest.raises(ParamsError) as err:
            load_params(path)
        msg = str(err.value)
        assert str(path) in msg and expect in msg.lower() if expect == "did you mean" else expect in msg, (name, msg)
