"""Stage scan: an index of the raw files with their content hashes.

Why a stage of its own: DVC cannot depend on "the videos in data/raw but not the captions beside
them". Were trim to depend on the folder, editing one caption would rerun trim and everything
after it. The index splits the folder in two files: `media.jsonl` (each clip or image, its hash and
whether a caption exists) and `captions.jsonl` (each caption file and its hash). Trim depends on
the first, captions on the second, so a caption edit reruns only this cheap hashing pass and the
stages downstream of captions.

Symlinks are followed only when they stay inside the dataset folder; loops and escapes are
reported, never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from wanlora.config import DatasetConfig
from wanlora.io import sha256_file, write_jsonl
from wanlora.report import Problem, settle, write_problems

VIDEO_EXT = {".mp4", ".mov", ".mkv", ".webm", ".avi"}
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp"}
MEDIA_EXT = VIDEO_EXT | IMAGE_EXT


@dataclass(frozen=True)
class Listing:
    media: list[Path]
    captions: list[Path]
    problems: list[Problem]


def list_folder(folder: Path, caption_ext: str) -> Listing:
    """Media and caption files under `folder`, sorted; unsafe links and unknown files reported."""
    root = folder.resolve()
    media: list[Path] = []
    captions: list[Path] = []
    problems: list[Problem] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(dirnames):
            link = Path(dirpath) / name
            if link.is_symlink():
                problems.append(Problem(str(link), "symlinked folder (not followed)", "copy the folder in instead", "scan"))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            problem = _unsafe_link(path, root)
            if problem:
                problems.append(problem)
                continue
            ext = path.suffix.lower()
            if ext in MEDIA_EXT:
                media.append(path)
            elif ext == "." + caption_ext.lower().lstrip("."):
                captions.append(path)
            else:
                problems.append(
                    Problem(str(path), f"unsupported file type '{ext or name}'",
                            "use mp4/mov/mkv/webm/avi videos, jpg/png/webp images and .txt captions", "scan")
                )
    return Listing(media, captions, problems)


def _unsafe_link(path: Path, root: Path) -> Problem | None:
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return Problem(str(path), "broken symlink or symlink loop", "replace the link with the real file", "scan")
    if root not in target.parents:
        return Problem(str(path), f"symlink points outside the dataset folder ({target})",
                       "copy the file into the dataset folder", "scan")
    return None


def caption_for(media: Path, caption_ext: str) -> Path:
    """The same-stem caption path of a media file (it may not exist)."""
    return media.with_suffix("." + caption_ext.lstrip("."))


def run_stage(datasets: dict[str, DatasetConfig], workspace: Path, out_dir: Path) -> None:
    """Write out_dir/media.jsonl, out_dir/captions.jsonl and out_dir/problems.json."""
    media_rows, caption_rows, all_problems = [], [], []
    for name, ds in datasets.items():
        folder = workspace / ds.folder
        if not folder.is_dir():
            raise FileNotFoundError(
                f"dataset '{name}': folder {folder} does not exist; create it or fix datasets.{name}.folder"
            )
        listing = list_folder(folder, ds.captions.extension)
        problems = list(listing.problems)
        for path in listing.media:
            if path.stat().st_size == 0:
                problems.append(Problem(str(path.relative_to(workspace)), "empty file (0 bytes)",
                                        "re-export or re-download the clip", "scan"))
            cap = caption_for(path, ds.captions.extension)
            media_rows.append({
                "id": f"{name}/{path.relative_to(folder).as_posix()}",
                "dataset": name,
                "path": path.relative_to(workspace).as_posix(),
                "sha256": sha256_file(path),
                "size": path.stat().st_size,
                "caption_path": cap.relative_to(workspace).as_posix() if cap.exists() else None,
            })
        for path in listing.captions:
            caption_rows.append({
                "id": f"{name}/{path.relative_to(folder).as_posix()}",
                "dataset": name,
                "path": path.relative_to(workspace).as_posix(),
                "sha256": sha256_file(path),
            })
        settle(problems, "skip", "scan")  # scan only reports; trim and captions apply on_error
        all_problems += problems
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "media.jsonl", media_rows)
    write_jsonl(out_dir / "captions.jsonl", caption_rows)
    write_problems(out_dir / "problems.json", all_problems)
