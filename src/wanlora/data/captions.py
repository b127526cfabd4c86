"""Stage captions: one checked caption per clip that made it into a bucket, with the trigger in it.

Captions are the only human-written input that reaches the text encoder, and the mistakes in them
are quiet: a file saved by a Windows editor in UTF-16, a caption that is empty, one so long that
UMT5 cuts the end off, a caption beside a video that was renamed. Each of these becomes a
`Problem` that names the file and the fix, instead of a LoRA that learned the wrong thing.

The DOP variant (trigger replaced by the preservation class) is written for every clip whether or
not DOP is on: it costs nothing here, the text cache encodes it with the caption, and so turning
DOP on later reruns no data stage, only train and what follows it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.progress import track

from wanlora.config import CaptionConfig, DatasetConfig, DopConfig, JobConfig
from wanlora.io import dataset_file, read_jsonl, sha256_text, write_jsonl
from wanlora.report import Problem, console, settle, write_problems

STAGE = "captions"
PLACEHOLDER = "[trigger]"
#: Replaced by the trigger word, as AI Toolkit's `inject_trigger_into_prompt` does with both.
PLACEHOLDERS = (PLACEHOLDER, "[name]")

# Byte-order marks, longest first: the UTF-32 LE mark starts with the UTF-16 LE one.
_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


class CaptionError(ValueError):
    """A caption that cannot be used; the message is the Problem's reason, `fix` what to do."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.fix = fix


@dataclass(frozen=True)
class Caption:
    text: str
    dop: str
    warnings: list[str] = field(default_factory=list)


def normalize_whitespace(text: str) -> str:
    """One space between words, none at the ends: line breaks and tabs mean nothing to UMT5,
    and a caption that differs only in spacing must hash (and cache) the same."""
    return " ".join(text.split())


def word_pattern(word: str) -> re.Pattern[str]:
    """`word` as a whole word, case-sensitive: 'sks' matches in 'a sks dog' and 'sks,' but not in 'sksy'."""
    return re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)")


def decode_caption(data: bytes, non_utf8: str) -> tuple[str, list[str]]:
    """Text of a caption file and any warnings; raises CaptionError for bytes we will not guess at.

    A byte-order mark is trusted (Notepad writes UTF-16 with one); without one the file must be
    UTF-8, or Latin-1 when the dataset allows it, because guessing encodings turns typos into
    silently different prompts.
    """
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec), []
            except UnicodeDecodeError as err:
                raise CaptionError(
                    f"starts with a {codec.upper()} byte-order mark but is not valid {codec.upper()} ({err.reason})",
                    "re-save the file as UTF-8",
                ) from None
    if b"\x00" in data:
        raise CaptionError(
            "contains NUL bytes (UTF-16 saved without a byte-order mark?)", "re-save the file as UTF-8"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"byte 0x{data[err.start]:02x} at offset {err.start}"
        if non_utf8 != "decode_latin1":
            raise CaptionError(
                f"not UTF-8 text ({where})",
                "re-save the file as UTF-8, or set datasets.<name>.captions.non_utf8: decode_latin1",
            ) from None
        return data.decode("latin-1"), [f"not UTF-8 ({where}); decoded as Latin-1"]
    return text, []


def check_trigger(trigger: str) -> None:
    """A trigger with brackets could rebuild a placeholder forever; refuse it up front."""
    if "[" in trigger or "]" in trigger:
        raise ValueError(
            f"job.trigger_word {trigger!r} contains square brackets, which clash with the [trigger] and "
            "[name] placeholders; set a plain word in params.yaml"
        )


def apply_trigger(text: str, trigger: str, position: str) -> str:
    """Replace [trigger] and [name] with the trigger word; add the word at `position` when the
    caption lacks it: "<trigger> <caption>" at the start, as AI Toolkit writes it.

    A caption that had a placeholder counts as having the trigger even when the replacement is
    glued to other letters ('[trigger]man'), so the word is never injected twice. Replacing repeats
    until no placeholder is left ('[[trigger]]' with trigger 'trigger' makes a new one); it ends
    because a bracket-free trigger never adds brackets while each replacement removes two.
    """
    check_trigger(trigger)
    had_placeholder = any(p in text for p in PLACEHOLDERS)
    while any(p in text for p in PLACEHOLDERS):
        for p in PLACEHOLDERS:
            text = text.replace(p, trigger)
    text = normalize_whitespace(text)
    if not trigger or had_placeholder or word_pattern(trigger).search(text) or position == "none":
        return text
    if not text:
        return trigger
    if position == "start":
        return f"{trigger} {text}"
    # end: a sentence keeps its full stop, a tag list gets one more tag
    return f"{text} {trigger}" if text[-1] in ".!?" else f"{text.rstrip(',;')}, {trigger}"


def dop_variant(caption: str, trigger: str, preservation_class: str) -> str:
    """The caption with every whole-word trigger replaced by the class ('sks dog' -> 'person dog')."""
    if not trigger:
        return caption
    return normalize_whitespace(word_pattern(trigger).sub(lambda _: preservation_class, caption))


def dropout_texts(trigger: str, preservation_class: str) -> tuple[str, str]:
    """What a dropped caption becomes, and the DOP class prompt of that step: the trigger word
    alone and the class word alone, or "" and "" without a trigger. AI Toolkit does the same on
    its live and cached paths (toolkit/dataloader_mixins.py, `get_dropout_caption` and
    `get_dop_dropout_caption`), so a dropped step still ties the trigger to the footage and
    DOP compares it against the class on its own."""
    trigger = normalize_whitespace(trigger)
    return trigger, dop_variant(trigger, trigger, preservation_class)


def build_caption(
    raw: str, trigger: str, cfg: CaptionConfig, preservation_class: str, count_tokens: Callable[[str], int]
) -> Caption:
    """A usable caption from decoded text, or CaptionError saying why not."""
    trigger = normalize_whitespace(trigger)
    if not normalize_whitespace(raw):
        raise CaptionError(
            "caption is empty", "write a caption, or set datasets.<name>.captions.default_caption (used for empty files)"
        )
    text = apply_trigger(raw, trigger, cfg.trigger_position)
    if not text:
        raise CaptionError("caption is empty once the trigger placeholder is replaced",
                           "write a caption or set job.trigger_word")
    warnings = []
    if trigger and text == trigger:
        warnings.append("caption is only the trigger word; describing the scene teaches the trigger better")
    n = count_tokens(text)
    if n > cfg.max_tokens:
        raise CaptionError(
            f"caption has {n} tokens, over the limit of {cfg.max_tokens}",
            f"shorten it to at most {cfg.max_tokens} tokens; the text encoder drops the rest",
        )
    return Caption(text, dop_variant(text, trigger, preservation_class), warnings)


def _clip_caption(
    clip: dict, ds: DatasetConfig, job: JobConfig, dop: DopConfig, workspace: Path, count_tokens: Callable[[str], int],
    trigger_only: bool = False, auto: dict | None = None,
) -> dict:
    """The captions.jsonl record of one clip; raises CaptionError with the reason and fix.

    Precedence: the user's caption file, then the clip's good auto caption (`auto`, a record of
    data/autocaptions/captions.jsonl), then the dataset's default caption. `origin` says which;
    `source` is the file read (the auto caption's .txt for auto), which `wanlora audit` re-hashes."""
    cfg = ds.captions
    rel = clip.get("caption_path")
    if trigger_only:  # AI Toolkit's unload_text_encoder: every clip is captioned by the trigger alone
        raw, warnings = "[trigger]", []
        origin, source, source_sha = "trigger_only", "trigger_only", sha256_text("[trigger]")
    elif rel and dataset_file(workspace, ds.folder, rel, f"caption of clip {clip['id']}").is_file():
        data = (workspace / rel).read_bytes()
        raw, warnings = decode_caption(data, cfg.non_utf8)
        origin, source, source_sha = "file", rel, hashlib.sha256(data).hexdigest()
        if not normalize_whitespace(raw) and cfg.default_caption.strip():  # AI Toolkit does the same
            warnings.append(f"{rel} is empty: used datasets.{clip['dataset']}.captions.default_caption")
            raw, origin, source, source_sha = cfg.default_caption, "default", "default", sha256_text(cfg.default_caption)
    elif rel:
        raise CaptionError(
            "caption file listed by the trim stage no longer exists", "restore it, or rerun `dvc repro` to rescan"
        )
    elif auto is not None:
        data = (workspace / auto["txt"]).read_bytes()
        raw, warnings = data.decode("utf-8"), []
        origin, source, source_sha = "auto", auto["txt"], hashlib.sha256(data).hexdigest()
    elif cfg.default_caption.strip():
        raw, warnings = cfg.default_caption, []
        origin, source, source_sha = "default", "default", sha256_text(cfg.default_caption)
    else:
        stem = Path(clip["path"]).with_suffix("." + cfg.extension.lstrip(".")).name
        raise CaptionError(
            f"no caption file (expected {stem} beside it)",
            f"write {stem}, or set datasets.{clip['dataset']}.captions.default_caption",
        )
    caption = build_caption(raw, job.trigger_word, cfg, dop.preservation_class, count_tokens)
    return {
        "id": clip["id"],
        "caption": caption.text,
        "caption_dop": caption.dop,
        "caption_sha256": sha256_text(caption.text),
        "origin": origin,
        "source": source,
        "source_sha256": source_sha,
        "warnings": warnings + caption.warnings,
    }


def run_stage(
    job: JobConfig,
    datasets: dict[str, DatasetConfig],
    dop: DopConfig,
    clips_manifest: Path,
    samples_manifest: Path,
    caption_index: Path,
    workspace: Path,
    out_dir: Path,
    count_tokens: Callable[[str], int],
    trigger_only: bool = False,
    autocaptions: Path | None = None,
) -> None:
    """Write out_dir/captions.jsonl (clips that have samples) and out_dir/problems.json.

    Which clip has which caption file comes from the scan stage's caption index (its `media`
    field), not from the clips manifest: adding a missing caption then changes only the caption
    chain, and trim and bucket do not rerun.

    `autocaptions` (the autocaption stage's captions.jsonl) supplies a caption for clips without
    a caption file; its bad captions are already reported there and are not used here.

    `trigger_only` (train.unload_text_encoder) ignores caption files: each clip's caption is the
    trigger word, as AI Toolkit trains when its text encoder is unloaded.

    Both files are written before any dataset's on_error policy can stop the stage, so a failed
    run still leaves the report that says what to fix.
    """
    index = read_jsonl(caption_index)
    pairs = {row["media"]: row["path"] for row in index if row["media"]}
    clips = {c["id"]: {**c, "caption_path": pairs.get(c["path"])} for c in read_jsonl(clips_manifest)}
    auto = {a["id"]: a for a in read_jsonl(autocaptions) if a["status"] == "ok"} if autocaptions else {}
    wanted = sorted({s["clip_id"] for s in read_jsonl(samples_manifest)})
    trigger = normalize_whitespace(job.trigger_word)
    check_trigger(trigger)
    if trigger and word_pattern(trigger).search(dop.preservation_class):
        console.print(
            f"[yellow]captions:[/] train.dop.preservation_class '{escape(dop.preservation_class)}' contains the "
            f"trigger word '{escape(trigger)}': the DOP captions keep the trigger; choose a class without it"
        )
    records: list[dict] = []
    problems: dict[str, list[Problem]] = {name: [] for name in datasets}
    for clip_id in track(wanted, description="captions", console=console, transient=True):
        clip = clips.get(clip_id)
        if clip is None:
            raise ValueError(
                f"{samples_manifest}: sample of clip '{clip_id}' that {clips_manifest} does not list; "
                "the manifests are out of step, rerun `dvc repro`"
            )
        ds = datasets.get(clip["dataset"])
        if ds is None:
            raise ValueError(
                f"{clips_manifest}: clip '{clip_id}' belongs to dataset '{clip['dataset']}', which params.yaml "
                "no longer has; rerun `dvc repro` after `wanlora sync`"
            )
        try:
            records.append(_clip_caption(clip, ds, job, dop, workspace, count_tokens, trigger_only, auto.get(clip_id)))
        except CaptionError as err:
            where = clip.get("caption_path") or clip["path"]
            fix = err.fix.replace("datasets.<name>", f"datasets.{clip['dataset']}")
            problems[clip["dataset"]].append(Problem(where, str(err), fix, STAGE))
    for row in index:  # the scan stage's orphans: caption files no clip or image claims
        if not row["media"] and row["dataset"] in problems:
            problems[row["dataset"]].append(Problem(row["path"], "caption file with no clip or image of the same name",
                                                    "rename it to match its clip, add the clip, or delete it", STAGE))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "captions.jsonl", records)
    write_problems(out_dir / "problems.json", [p for ps in problems.values() for p in ps])
    for name, ds in datasets.items():
        settle(problems[name], ds.on_error, STAGE)
