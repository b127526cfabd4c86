"""latent_cache: pixels from sample records, shapes, equality with a direct VAE encode, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import clip_frames, shared_tiny_model, write_clip
from PIL import Image

from wanlora.io import write_jsonl
from wanlora.models import latents
from wanlora.models.geometry import latent_shape, tokens
from wanlora.models.latents import (
    CacheError,
    denormalize_latents,
    draw_latent,
    encode_frames,
    load_frames,
    load_latents,
    normalize_latents,
    run_stage,
)
from wanlora.models.loading import load_vae, load_vae_config, model_identity


def _sample(sid, path, indices, crop, size=(32, 16), flip=False, kind="video", dataset="main"):
    w, h = size
    return {
        "id": sid, "clip_id": sid.split("#")[0], "dataset": dataset, "path": path, "sha256": "ab" * 32,
        "kind": kind, "width": w, "height": h, "num_frames": len(indices), "bucket": f"{w}x{h}x{len(indices)}",
        "frame_indices": indices, "crop": crop, "flip": flip,
    }


@pytest.fixture
def workspace(tmp_path):
    write_clip(tmp_path / "data/raw/a.mp4", clip_frames(12, 48, 40))
    Image.fromarray(clip_frames(1, 20, 12, seed=5)[0]).save(tmp_path / "data/raw/b.png")
    return tmp_path


def test_latent_shape_rule():
    assert latent_shape(33, 512, 512) == (16, 9, 64, 64)
    assert latent_shape(1, 480, 832) == (16, 1, 60, 104)
    assert latent_shape(81, 480, 832) == (16, 21, 60, 104)
    assert tokens(33, 512, 512) == 9216
    assert tokens(81, 480, 832) == 21 * 30 * 52
    with pytest.raises(ValueError, match="32 frames: the Wan VAE needs 4n\\+1.*use 29"):
        latent_shape(32, 512, 512)


def test_vae_output_follows_the_shape_rule(tmp_path_factory):
    vae = load_vae(shared_tiny_model(tmp_path_factory), "fp32")
    for f, h, w in [(1, 16, 32), (5, 16, 32), (9, 32, 16)]:
        mean, logvar = encode_frames(vae, torch.zeros(3, f, h, w))
        assert tuple(mean.shape) == latent_shape(f, h, w) == tuple(logvar.shape)


def test_frame_count_not_4n_plus_1_is_refused(tmp_path_factory, workspace):
    vae = load_vae(shared_tiny_model(tmp_path_factory), "fp32")
    with pytest.raises(ValueError, match="encode_frames: 6 frames, but the Wan VAE needs 4n\\+1.*use 5 frames"):
        encode_frames(vae, torch.zeros(3, 6, 16, 16))
    bad = _sample("main/a.mp4#0", "data/raw/a.mp4", [0, 1, 2, 3, 4, 5], [0, 0, 48, 40])
    with pytest.raises(ValueError, match="sample main/a.mp4#0: 6 frames"):
        load_frames(bad, workspace)


def test_load_frames_crops_resizes_flips_and_scales(workspace):
    image = _sample("main/b.png#0", "data/raw/b.png", [0], [2, 4, 16, 8], size=(8, 4), kind="image")
    pixels = load_frames(image, workspace)
    src = np.asarray(Image.open(workspace / "data/raw/b.png"))[4:12, 2:18].astype(np.float64)
    expected = src.reshape(4, 2, 8, 2, 3).mean(axis=(1, 3))  # 2x area averaging of the crop
    got = ((pixels[:, 0].permute(1, 2, 0).double() + 1) * 127.5)
    assert pixels.shape == (3, 1, 4, 8) and pixels.dtype == torch.float32
    assert np.abs(got.numpy() - expected).max() <= 0.51  # cv2 rounds to uint8
    flipped = load_frames({**image, "flip": True}, workspace)
    assert torch.equal(flipped, pixels.flip(-1))

    video = _sample("main/a.mp4#0", "data/raw/a.mp4", [3, 4, 5, 6, 7], [8, 4, 32, 32], size=(16, 16))
    v = load_frames(video, workspace)
    assert v.shape == (3, 5, 16, 16) and -1 <= v.min() and v.max() <= 1
    assert not torch.equal(v[:, 0], v[:, 4])  # distinct moving frames, not one repeated
    with pytest.raises(ValueError, match="crop \\[40, 0, 16, 16\\] lies outside the 48x40 frames"):
        load_frames({**video, "crop": [40, 0, 16, 16]}, workspace)


def _stage(root, workspace, samples, mode="distribution", enabled=("main",)):
    write_jsonl(workspace / "samples.jsonl", samples)
    out = workspace / "cache"
    run_stage(root, workspace / "samples.jsonl", workspace, out, mode, "fp32", "cpu", set(enabled),
              {d: "data/raw" for d in enabled})
    return out


@pytest.fixture
def counted(monkeypatch):
    calls: list[str] = []
    real = latents.encode_sample

    def spy(vae, sample, workspace, mode, *variant):
        calls.append(sample["id"])
        return real(vae, sample, workspace, mode, *variant)

    monkeypatch.setattr(latents, "encode_sample", spy)
    return calls


def test_cache_equals_direct_encode_and_reruns_encode_nothing(tmp_path_factory, workspace, counted):
    root = shared_tiny_model(tmp_path_factory)
    samples = [
        _sample("main/a.mp4#0", "data/raw/a.mp4", [0, 1, 2, 3, 4], [0, 0, 48, 40], size=(32, 32)),
        _sample("main/a.mp4#0f", "data/raw/a.mp4", [0, 1, 2, 3, 4], [0, 0, 48, 40], size=(32, 32), flip=True),
        _sample("main/b.png#0", "data/raw/b.png", [0], [0, 0, 20, 12], size=(16, 16), kind="image"),
        _sample("extra/a.mp4#0", "data/raw/a.mp4", [4, 5, 6, 7, 8], [0, 0, 48, 40], dataset="extra"),
    ]
    out = _stage(root, workspace, samples)
    assert sorted(counted) == ["main/a.mp4#0", "main/a.mp4#0f", "main/b.png#0"]  # extra: not enabled

    vae = load_vae(root, "fp32")
    vae_id = model_identity(root, "vae")
    for s in samples[:3]:
        cached = load_latents(out, s["id"], expect_vae=vae_id)
        mean, logvar = encode_frames(vae, load_frames(s, workspace))
        assert torch.equal(cached["mean"], mean) and torch.equal(cached["logvar"], logvar)
        assert tuple(cached["mean"].shape) == latent_shape(s["num_frames"], s["height"], s["width"])
    key = json.loads((out / "index.json").read_text())["samples"]["main/a.mp4#0"]
    from safetensors import safe_open

    with safe_open(str(out / f"{key}.safetensors"), "pt") as f:
        assert f.metadata() == {
            "vae": vae_id, "sample_id": "main/a.mp4#0", "bucket": "32x32x5", "dtype": "fp32",
            "mode": "distribution", "sha256": "ab" * 32, "frames": "5",
        }

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    _stage(root, workspace, samples)
    assert len(counted) == 3  # rerun: nothing encoded
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == before

    _stage(root, workspace, samples[:1] + samples[2:])  # a sample dropped: its file goes
    assert len(counted) == 3 and len(list(out.glob("*.safetensors"))) == 2
    with pytest.raises(CacheError, match="no latents for sample 'main/a.mp4#0f'.*latent_cache"):
        load_latents(out, "main/a.mp4#0f")
    with pytest.raises(CacheError, match=r"made with VAE .*dvc repro -f -s latent_cache`, then run `dvc repro`"):
        load_latents(out, "main/a.mp4#0", expect_vae="0123456789abcdef")


def test_mode_stores_the_mean(tmp_path_factory, workspace):
    root = shared_tiny_model(tmp_path_factory)
    s = _sample("main/b.png#0", "data/raw/b.png", [0], [0, 0, 20, 12], size=(16, 16), kind="image")
    out = _stage(root, workspace, [s], mode="mode")
    cached = load_latents(out, s["id"])
    mean, _ = encode_frames(load_vae(root, "fp32"), load_frames(s, workspace))
    assert list(cached) == ["latent"] and torch.equal(cached["latent"], mean)
    assert draw_latent(cached) is cached["latent"]


def test_draw_latent_samples_the_stored_gaussian():
    cached = {"mean": torch.full((16, 1, 2, 2), 3.0), "logvar": torch.full((16, 1, 2, 2), np.log(4.0))}
    a = draw_latent(cached, torch.Generator().manual_seed(0))
    eps = torch.randn((16, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, 3.0 + 2.0 * eps)


def test_normalisation_matches_wan_pipeline_decode(tmp_path_factory):
    cfg = load_vae_config(shared_tiny_model(tmp_path_factory))
    z = torch.randn(2, 16, 3, 4, 4)
    n = normalize_latents(z, cfg)
    mean = torch.tensor(cfg["latents_mean"]).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg["latents_std"]).view(1, 16, 1, 1, 1)
    assert torch.allclose(n / inv_std + mean, z, atol=1e-6)  # WanPipeline's decode-side formula
    assert torch.allclose(denormalize_latents(n, cfg), z, atol=1e-6)
    assert torch.allclose(normalize_latents(z[0], cfg), n[0])  # unbatched [C, F, H, W] too
    with pytest.raises(ValueError, match="expected \\[..., 16, F, H, W\\]"):
        normalize_latents(torch.zeros(3, 8, 4, 4), cfg)


def test_store_survives_dvc_deleting_the_cache_folder(tmp_path):
    """DVC deletes outs before a rerun: items come back from the scratch store, not the VAE."""
    import shutil

    import torch

    from wanlora.models import cachefiles

    store, out = tmp_path / "store", tmp_path / "out"
    cachefiles.save_item(out, store, "k1", {"mean": torch.arange(4.0)}, {"vae": "v1"})
    assert cachefiles.item_path(out, "k1").stat().st_ino == cachefiles.item_path(store, "k1").stat().st_ino
    shutil.rmtree(out)
    assert cachefiles.restore(out, store, "k1", vae="v1")
    assert cachefiles.read_item(cachefiles.item_path(out, "k1"), "", vae="v1")["mean"].tolist() == [0, 1, 2, 3]
    assert not cachefiles.restore(out, store, "k1", vae="other-vae")
    assert not cachefiles.restore(out, store, "missing", vae="v1")


def test_an_undecodable_sample_is_reported_and_skipped(tmp_path_factory, workspace, monkeypatch):
    """One bad window must not stop the whole cache: it is reported, the rest is encoded."""
    real = latents.encode_sample

    def flaky(vae, sample, ws, mode, *variant):
        if sample["id"] == "main/a.mp4#0":
            raise ValueError("frames [7, 9] cannot be decoded")
        return real(vae, sample, ws, mode, *variant)

    monkeypatch.setattr(latents, "encode_sample", flaky)
    samples = [
        _sample("main/a.mp4#0", "data/raw/a.mp4", [0, 1, 2, 3, 4], [0, 0, 48, 40], size=(32, 32)),
        _sample("main/b.png#0", "data/raw/b.png", [0], [0, 0, 20, 12], size=(16, 16), kind="image"),
    ]
    out = _stage(shared_tiny_model(tmp_path_factory), workspace, samples)
    assert list(json.loads((out / "index.json").read_text())["samples"]) == ["main/b.png#0"]
    problems = json.loads((out / "problems.json").read_text())["problems"]
    assert [p["path"] for p in problems] == ["data/raw/a.mp4"]
    assert "main/a.mp4#0 cannot be encoded: frames [7, 9] cannot be decoded" in problems[0]["reason"]


def test_frames_scaled_as_decoded_equal_whole_frames_scaled_after(workspace):
    """Crop and resize per decoded frame give exactly the pixels of decoding all frames first."""
    import cv2

    from wanlora.media.decode import read_frames

    def fit(f):
        return cv2.resize(np.ascontiguousarray(f[4:38, 8:38]), (16, 16), interpolation=cv2.INTER_AREA)

    video = _sample("main/a.mp4#0", "data/raw/a.mp4", [2, 3, 5, 8, 9, 3], [8, 4, 30, 34], size=(16, 16))
    path = workspace / "data/raw/a.mp4"
    want = np.stack([fit(f) for f in read_frames(path, video["frame_indices"])])
    assert np.array_equal(read_frames(path, video["frame_indices"], transform=fit), want)
    video["num_frames"] = 5
    video["frame_indices"] = video["frame_indices"][:5]
    got = load_frames(video, workspace)
    assert torch.equal(got, torch.from_numpy(want[:5]).permute(3, 0, 1, 2).float() / 127.5 - 1.0)


# VmHWM (peak RSS of this process image), not ru_maxrss, which Linux carries over from the
# forking parent across exec and would hide growth below pytest's own size.
_PEAK = """
import json, re, sys
from pathlib import Path
from wanlora.models.latents import load_frames
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
sample = json.loads(sys.argv[1])
base = hwm()
pixels = load_frames(sample, Path(sys.argv[2]))
print(json.dumps({"shape": list(pixels.shape), "mib": (hwm() - base) / 1024}))
"""


def test_huge_clip_memory_follows_the_bucket_not_the_source(tmp_path):
    """The review's experiment: a small 8192x8192 clip took 4.2 GB to make a 9-frame 64x64 sample
    (every frame kept at full RGB size before resizing). Peak RSS growth of a fresh process is
    bounded now by about one source frame; nine 8192x8192 RGB frames alone are 1728 MiB."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc for the peak RSS")
    import subprocess
    import sys

    import av

    path = tmp_path / "big.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = 8192
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast", "crf": "40"}
        rgb = np.zeros((8192, 8192, 3), np.uint8)
        rgb[:, :, 0] = np.arange(8192, dtype=np.uint8)[None, :]
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        del rgb
        for t in range(9):
            frame.pts = t
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    sample = _sample("main/big.mp4#0", "big.mp4", list(range(9)), [0, 0, 8192, 8192], size=(64, 64))
    run = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(sample), str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["shape"] == [3, 9, 64, 64]
    assert got["mib"] < 1200, got  # 691 MiB, was 3737 MiB (bench/RESULTS.md)


def test_sample_path_leaving_the_dataset_folder_stops_the_stage(tmp_path_factory, workspace, tmp_path):
    """A samples.jsonl swapped on a shared remote can name any file; the stage refuses it before
    decoding anything, and so does the trainer's dataset (on-the-fly encoding reads the same path)."""
    from wanlora.data.dataset import build_dataset
    from wanlora.io import ManifestPathError

    outside = tmp_path.parent / "elsewhere.mp4"
    write_clip(outside, clip_frames(9, 48, 40))
    good = _sample("main/a.mp4#0", "data/raw/a.mp4", [0, 1, 2, 3, 4], [0, 0, 48, 40])
    bad = _sample("main/x.mp4#0", "data/raw/../../elsewhere.mp4", [0, 1, 2, 3, 4], [0, 0, 48, 40])
    with pytest.raises(ManifestPathError, match=r"sample main/x.mp4#0: path 'data/raw/../../elsewhere.mp4' lies "
                                                r"outside its dataset folder data/raw"):
        _stage(shared_tiny_model(tmp_path_factory), workspace, [good, bad])
    assert not (workspace / "cache/index.json").exists()
    write_jsonl(workspace / "data/buckets/samples.jsonl", [good, {**bad, "path": str(outside)}])
    write_jsonl(workspace / "data/captions/captions.jsonl",
                [{"id": s["clip_id"], "caption": "sks", "caption_dop": None} for s in (good, bad)])
    from wanlora.config import parse_params
    from wanlora.data.split import run_stage as split_stage
    from wanlora.pipeline import CAPTION_MANIFEST, SAMPLES, SPLIT_FILE

    split_stage(parse_params({"sample": {"validation_clips": 0}}), workspace / SAMPLES,
                workspace / CAPTION_MANIFEST, workspace / SPLIT_FILE)  # the trainer reads the split
    with pytest.raises(ManifestPathError, match="outside its dataset folder data/raw"):
        build_dataset(workspace, vae_config={}, expect_vae=None, cached_datasets=set(), folders={"main": "data/raw"},
                      encode=lambda record: {})
