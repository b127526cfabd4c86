"""Which files of a dataset folder are media, which are captions, and which must be reported.

The walk is sorted at every level so the manifest order and the problem list never depend on the
file system. Links are read only when they stay inside the dataset folder: a link out of it would
make the dataset's content depend on files DVC does not track, and a link loop would hang a naive
walk. Dotfiles (.DS_Store, editor swap files) are ignored silently; any other unknown file is
reported, because a clip in an unsupported format is usually a clip the user expects to train on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wanlora.media.probe import IMAGE_EXT, VIDEO_EXT
from wanlora.report import Problem

STAGE = "trim"


@dataclass(frozen=True)
class Listing:
    media: list[Path]  # files to probe, in sorted order (path as found, links not resolved)
    captions: dict[Path, Path]  # media file -> its same-stem caption
    problems: list[Problem]  # links out of the folder, loops, unknown files, orphan captions
    orphans: list[Path]  # caption files no media file claims (each also in `problems`)


def list_dataset(folder: Path, caption_ext: str, show: Callable[[Path], str] = str) -> Listing:
    """Walk `folder`; `show` turns a path into the form used in problem reports."""
    root = folder.resolve()
    caption_suffix = "." + caption_ext.lstrip(".").lower()
    media: list[Path] = []
    caption_files: list[Path] = []
    problems: list[Problem] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in list(dirnames):
            sub = Path(dirpath) / name
            if sub.is_symlink():  # os.walk does not descend into it; say why its files are missing
                dirnames.remove(name)
                why = _link_problem(sub, root)
                fix = "copy the folder into the dataset instead of linking it"
                problems.append(Problem(show(sub), why or "link to a folder (not followed)", fix, STAGE))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_symlink():
                why = _link_problem(path, root)
                if why:
                    fix = "copy the file into the dataset folder instead of linking it"
                    problems.append(Problem(show(path), why, fix, STAGE))
                    continue
            ext = path.suffix.lower()
            if ext in VIDEO_EXT or ext in IMAGE_EXT:
                media.append(path)
            elif ext == caption_suffix:
                caption_files.append(path)
            else:
                problems.append(
                    Problem(
                        show(path),
                        f"unsupported file type '{ext or '(none)'}'",
                        "convert videos to .mp4 and images to .png/.jpg, or move the file out of the dataset folder",
                        STAGE,
                    )
                )
    by_stem = {(p.parent, p.stem): p for p in caption_files}
    captions = {m: by_stem[(m.parent, m.stem)] for m in media if (m.parent, m.stem) in by_stem}
    used = set(captions.values())
    orphans = [cap for cap in caption_files if cap not in used]
    for cap in orphans:
        problems.append(Problem(show(cap), "caption without a matching clip or image",
                                "rename it to the stem of its clip (e.g. clip.mp4 -> clip.txt) or delete it", STAGE))
    return Listing(media, captions, problems, orphans)


def _link_problem(path: Path, root: Path) -> str | None:
    """Why a link cannot be followed (loop, dangling, leaves the dataset folder), or None if fine."""
    try:
        target = path.resolve(strict=True)
    except RuntimeError:
        return "symlink loop"
    except OSError as err:
        return "symlink loop" if err.errno == 40 else "dangling symlink (target missing)"
    if target != root and root not in target.parents:
        return f"symlink points outside the dataset folder (to {target})"
    return None
