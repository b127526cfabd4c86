"""Stage autocaption: a vision-language model writes a caption for each clip that has none.

It sees what will be trained, not the raw file: frames spread over the kept range the trim stage
found, cropped to the picture inside any letterbox bars. Each finished caption is kept in a
content-keyed store under `scratch/` (key: media hash, kept range, crop, model identity, prompt
and decoding settings), so adding one clip captions one clip, and DVC deleting the stage's outputs
before a rerun costs nothing. The captioner is loaded only when some clip misses the store, and
freed before the stage ends: it never shares the GPU with anything else.

A caption is checked before the captions stage may use it: empty, longer than the text encoder
keeps, repeating itself, or a refusal is reported in problems.json and not written as a `.txt`,
so the captions stage falls back to the default caption (or reports the clip) instead of training
on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.progress import track

from wanlora.config import AutocaptionConfig, DatasetConfig
from wanlora.data.captions import normalize_whitespace
from wanlora.io import atomic_write_json, atomic_write_text, read_jsonl, sha256_json, sha256_text, write_jsonl
from wanlora.report import Problem, console, write_problems

STAGE = "autocaption"
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i can(?:no|')t|i cannot|i am unable|i'm unable|unable to|as an ai|"
    r"i (?:do not|don't) (?:see|have)|there (?:is|are) no (?:image|frame|video)s?)",
    re.IGNORECASE,
)


class Describer(Protocol):
    """What the stage needs of a captioner (`wanlora.models.captioner.Captioner`; tests pass fakes)."""

    def __call__(self, frames: Sequence[np.ndarray], instruction: str) -> str: ...

    def close(self) -> None: ...


def frame_indices(keep_start: int, keep_end: int, count: int) -> list[int]:
    """`count` frames spread evenly over [keep_start, keep_end), centred in equal slices, so the
    first and last frames of the kept range (often a fade's edge) are not over-weighted."""
    n = max(1, keep_end - keep_start)
    count = min(count, n)
    return [keep_start + int((i + 0.5) * n / count) for i in range(count)]


def crop_frames(frames: np.ndarray, crop: Sequence[int] | None) -> np.ndarray:
    """Frames [F, H, W, 3] cut to the trim stage's [x, y, w, h] picture (the bars removed)."""
    if not crop:
        return frames
    x, y, w, h = crop
    return frames[:, y:y + h, x:x + w]


def repeats_itself(text: str) -> bool:
    """True when a run of words repeats back to back: one word four times ("a a a a") or a phrase of
    2-12 words three times in a row, the loop a greedy decoder falls into."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    for n in range(1, 13):
        copies = 4 if n == 1 else 3
        for i in range(len(words) - n * copies + 1):
            if all(words[i + k * n:i + (k + 1) * n] == words[i:i + n] for k in range(1, copies)):
                return True
    return False


def caption_problem(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> str | None:
    """Why a generated caption must not be trained, or None when it may."""
    if not text:
        return "the captioner wrote an empty caption"
    if _REFUSAL.search(text):
        return f"the captioner refused ({text[:60]!r})"
    if repeats_itself(text):
        return "the caption repeats itself (a decoding loop)"
    n = count_tokens(text)
    if n > max_tokens:
        return f"the caption has {n} tokens, over the text encoder's {max_tokens}"
    return None


def store_key(clip: dict, cfg: AutocaptionConfig, identity: str) -> str:
    """What a caption depends on: the media bytes, the kept range and crop, the model, the prompt
    and every setting that changes what is generated."""
    return sha256_json({
        "media": clip["sha256"], "keep": [clip["keep_start"], clip["keep_end"]], "crop": clip["crop"],
        "model": identity, "dtype": cfg.dtype, "prompt": sha256_text(cfg.prompt), "frames": cfg.frames,
        "frame_side": cfg.frame_side, "max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams,
        "repetition_penalty": cfg.repetition_penalty,
    })


def wanted(clips: list[dict], mode: str, captioned: set[str]) -> list[dict]:
    """The usable clips the mode asks to caption: those whose path is not in `captioned` (the
    media paths the scan stage found a caption file beside), or all of them."""
    ok = [c for c in clips if c.get("status") == "ok"]
    if mode == "off":
        return []
    return ok if mode == "all" else [c for c in ok if c["path"] not in captioned]


def txt_path(clip: dict, datasets: dict[str, DatasetConfig], workspace: Path, out_dir: Path) -> Path:
    """Where a clip's readable caption goes: its path inside the dataset folder, under out_dir/<dataset>/,
    with the caption extension, so copying it beside the clip makes it the user's own caption."""
    ds = datasets[clip["dataset"]]
    rel = (workspace / clip["path"]).relative_to(workspace / ds.folder)
    return out_dir / clip["dataset"] / rel.with_suffix("." + ds.captions.extension.lstrip("."))


def run_stage(
    clips_manifest: Path,
    caption_index: Path,
    datasets: dict[str, DatasetConfig],
    cfg: AutocaptionConfig,
    workspace: Path,
    out_dir: Path,
    store: Path,
    model: str,
    identity: str,
    open_describer: Callable[[], Describer],
    read_frames: Callable[[Path, list[int]], np.ndarray],
    count_tokens: Callable[[str], int],
) -> None:
    """Write out_dir/captions.jsonl, one .txt per good caption, and out_dir/problems.json.

    `model` is the captioner's name@revision for people, `identity` its content hash
    (`captioner_identity`), read without loading it; `open_describer`
    loads it, and is called only when some clip is not in the store. Bad captions are stored too:
    the same inputs would give the same bad caption, and the report already says what to change.
    """
    todo = wanted(read_jsonl(clips_manifest), cfg.mode, {row["media"] for row in read_jsonl(caption_index)})
    describer: Describer | None = None
    records, problems = [], []
    try:
        for clip in track(todo, description="autocaption", console=console, transient=True):
            key = store_key(clip, cfg, identity)
            entry = store / f"{key}.json"
            if entry.is_file():
                result = read_jsonl(entry)[0]
            else:
                if describer is None:
                    describer = open_describer()
                indices = frame_indices(clip["keep_start"], clip["keep_end"], cfg.frames)
                frames = crop_frames(read_frames(workspace / clip["path"], indices), clip["crop"])
                text = normalize_whitespace(describer(list(frames), cfg.prompt))
                limit = datasets[clip["dataset"]].captions.max_tokens
                result = {"caption": text, "problem": caption_problem(text, count_tokens, limit), "frames": indices}
                write_jsonl(entry, [{"id": key, **result}])
            record = {
                "id": clip["id"], "dataset": clip["dataset"], "path": clip["path"], "sha256": clip["sha256"],
                "keep_start": clip["keep_start"], "keep_end": clip["keep_end"], "crop": clip["crop"],
                "frames": result["frames"], "model": model, "model_identity": identity,
                "prompt_sha256": sha256_text(cfg.prompt),
                "caption": result["caption"], "status": "bad" if result["problem"] else "ok",
            }
            if result["problem"]:
                record["reason"] = result["problem"]
                problems.append(Problem(
                    clip["path"], result["problem"],
                    f"write {txt_path(clip, datasets, workspace, out_dir).name} beside the clip yourself, or change "
                    "autocaption.prompt or autocaption.repetition_penalty and rerun", STAGE,
                ))
            else:
                target = txt_path(clip, datasets, workspace, out_dir)
                atomic_write_text(target, result["caption"] + "\n")
                record["txt"] = target.relative_to(workspace).as_posix()
            records.append(record)
    finally:
        if describer is not None:
            describer.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "captions.jsonl", records)
    write_problems(out_dir / "problems.json", problems)
    atomic_write_json(out_dir / "summary.json", {
        "mode": cfg.mode, "captioned": sum(r["status"] == "ok" for r in records), "bad": len(problems),
        "model": model, "model_identity": identity,
    })
    for p in problems:
        console.print(f"[yellow]{STAGE}: not used[/] {p.line()}")
