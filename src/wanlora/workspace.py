"""Setting up a workspace: git + DVC initialised, dvc.yaml and stages/ written, scratch ignored.

A workspace is any folder holding params.yaml (`wanlora sync` writes its dvc.yaml). Everything a person runs by hand
(`wanlora plan`, `export`, `audit`, ...) first finds it with `require`, so a command typed in the
wrong folder says where the workspace is instead of acting on an empty one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from wanlora.config import Params, load_params
from wanlora.errors import UserError
from wanlora.io import atomic_write_json, atomic_write_text
from wanlora.pipeline import STAGES, ignored_outputs, is_repo_checkout, stale_files, sync

#: Never versioned: resumable training state, downloaded or generated models, bytecode.
GITIGNORE = ("/scratch/", "/models/", "__pycache__/")


class NotAWorkspace(UserError, FileNotFoundError):
    """A command ran outside a workspace; the message says where one is, or how to make one."""


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed in {cwd}:\n{result.stdout}{result.stderr}")


def prepare(workspace: Path, params: Params, own_repo: bool = False) -> None:
    """Make `workspace` runnable with `dvc repro`; idempotent, never touches data/raw.

    Inside an existing git repository the workspace becomes a DVC sub-project of it, unless
    `own_repo` (the demo: a self-contained repository that can be pushed, cloned and audited).
    """
    workspace.mkdir(parents=True, exist_ok=True)
    inside_git = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=workspace,
                                capture_output=True, text=True).returncode == 0
    if (own_repo or not inside_git) and not (workspace / ".git").exists():
        _run(["git", "init", "-q"], workspace)
        inside_git = False
    if not (workspace / ".dvc").exists():
        # a workspace inside a larger git repository becomes a DVC sub-project of it
        subdir = ["--subdir"] if inside_git and not (workspace / ".git").exists() else []
        _run([sys.executable, "-m", "dvc", "init", "-q", *subdir], workspace)
        _run([sys.executable, "-m", "dvc", "config", "core.autostage", "true"], workspace)
    ignore_lines(workspace / ".gitignore", [*GITIGNORE, *ignored_outputs()])
    for ds in params.datasets.values():
        (workspace / ds.folder).mkdir(parents=True, exist_ok=True)
    sync(workspace, params, in_repo=is_repo_checkout(workspace))


def ignore_lines(gitignore: Path, lines: list[str]) -> None:
    """Append the lines `gitignore` lacks, keeping what the person wrote there."""
    text = gitignore.read_text(encoding="utf-8") if gitignore.exists() else ""
    have = set(text.splitlines())
    missing = [line for line in lines if line not in have]
    if missing:
        atomic_write_text(gitignore, text + ("" if not text or text.endswith("\n") else "\n") + "\n".join(missing) + "\n")


def has_commit(workspace: Path) -> bool:
    """True when the git repository holding `workspace` has a HEAD commit (dvclive needs one)."""
    return subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=workspace,
                          capture_output=True).returncode == 0


def track_raw(workspace: Path, params: Params) -> None:
    """`dvc add` every dataset folder, so the exact clips behind a LoRA can be pushed and pulled.

    Refuses folders holding symlinks: DVC follows them (a loop crashes it, and a link out of the
    folder is replaced by a copy of its target, which would modify the raw data we promise to keep).
    """
    links = sorted(p.relative_to(workspace).as_posix() for ds in params.datasets.values()
                   for p in _walk_links(workspace / ds.folder))
    if links:
        listing = "\n".join(f"  {p}" for p in links)
        raise UserError(f"cannot track the raw data with DVC while it holds symlinks (`dvc add` would replace "
                        f"each with a copy of its target):\n{listing}\nFix: replace each link with the file itself, "
                        "or move it out of the folder")
    folders = sorted({ds.folder for ds in params.datasets.values()})
    _run([sys.executable, "-m", "dvc", "add", "-q", *folders], workspace)


def _walk_links(folder: Path) -> list[Path]:
    """Every symlink under `folder` (not followed), links to files inside it included."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [Path(root) / n for n in dirs + files if (Path(root) / n).is_symlink()]
    return found


def commit(workspace: Path, message: str) -> None:
    """Commit the workspace's pipeline files; dvclive and lineage need a git revision to point at.

    The person's own git identity is used when they have one; wanlora's only stands in for it.
    """
    _run(["git", "add", "-A", "."], workspace)
    named = subprocess.run(["git", "config", "user.email"], cwd=workspace, capture_output=True).returncode == 0
    identity = [] if named else ["-c", "user.name=wanlora", "-c", "user.email=wanlora@localhost"]
    _run(["git", *identity, "commit", "-q", "--allow-empty", "-m", message], workspace)


def require(workspace: Path) -> Path:
    """`workspace` when it holds params.yaml; else NotAWorkspace saying where a workspace is.

    Looks up the parents (run from a subfolder) and one level down (run from the folder above
    it), the two mistakes a person makes; suggests `wanlora init` only when there is none near.
    """
    workspace = Path(workspace)
    if (workspace / "params.yaml").is_file():
        return workspace
    here = workspace.resolve()
    near = [p for p in here.parents if (p / "params.yaml").is_file()][:1]
    if here.is_dir():
        near += sorted(p for p in here.iterdir() if (p / "params.yaml").is_file())
    where = f"{workspace} is not a wanlora workspace (no params.yaml)"
    if near:
        found = ", ".join(str(p) for p in near)
        raise NotAWorkspace(f"{where}; found one at {found}: `cd` there or pass `-w {near[0]}`")
    raise NotAWorkspace(f"{where}: `cd` into the folder `wanlora init` made or pass `-w FOLDER`; "
                        "run `wanlora init` only to make a new workspace")


def check_stage(workspace: Path, out: Path) -> None:
    """The check stage, once params.yaml has loaded (validated whole): now the workspace itself.

    Stage outputs committed to git (a `git add -A` after a failed first run, before DVC ignored
    them) make DVC refuse to save them after hours of training, so they are refused here, first.
    """
    outs = [out for stage in STAGES for out in stage.outs]
    listed = subprocess.run(["git", "ls-files", "--", *outs], cwd=workspace, capture_output=True, text=True)
    tracked = sorted({next(o for o in outs if f == o or f.startswith(f"{o}/")) for f in listed.stdout.splitlines()})
    if listed.returncode == 0 and tracked:
        raise UserError(
            f"git tracks stage outputs that DVC must own: {', '.join(tracked)}. Fix: "
            f"`git rm -r -q --cached {' '.join(tracked)} && git commit -m 'untrack stage outputs'`, then `dvc repro`"
        )
    _check_synced(workspace)
    atomic_write_json(out, {"checked": ["params.yaml", "stage outputs not in git",
                                                             "dvc.yaml matches params.yaml"]})


def _check_synced(workspace: Path) -> None:
    """dvc.yaml lists params and folders per dataset: one added to params.yaml without `wanlora
    sync` would be read by no stage's declared deps, and its clips would change nothing DVC sees.
    Its plots name the model's experts (`plotted_experts`), so another model.variant resyncs too."""
    stale = stale_files(workspace, load_params(workspace / "params.yaml"), is_repo_checkout(workspace))
    if workspace / "dvc.yaml" in stale:  # the stage scripts check their own version when they run
        raise UserError("dvc.yaml no longer matches params.yaml (a dataset added or renamed, or another "
                        "model.variant?). Fix: run `wanlora sync`, then `dvc repro`")


def check_model(name_or_path: str, workspace: Path) -> str:
    """What `wanlora init --model` was given, checked now rather than at the first `dvc repro`.

    A folder (relative to the workspace, where the stages run) must hold a complete diffusers
    layout; a value that is no folder is accepted only in hub-id form (owner/name), with a note
    that it is downloaded later. Returns the line to tell the person.
    """
    from wanlora.models.loading import ALL_PARTS, ModelError, check_layout

    local = workspace / Path(name_or_path).expanduser()
    if local.is_dir():
        check_layout(local, ALL_PARTS)
        return f"model: the diffusers folder {local}"
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelError(f"--model {name_or_path}: no such folder ({local.resolve()}), and not a hub id "
                         "(owner/name). Fix: give the folder that holds model_index.json, or a hub id such as "
                         "Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    return f"model: no folder {local} here, so {name_or_path} is a hub id, downloaded by the first `dvc repro`"


def dvc_repro(workspace: Path, *args: str) -> None:
    """`dvc repro` in the workspace with this interpreter's environment first on PATH (the stages
    run `python`, which must be the one wanlora is installed in)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=workspace, env=env)
    if result.returncode:
        cmd = " ".join(["dvc repro", *args])
        raise UserError(f"`{cmd}` failed in {workspace} (exit {result.returncode}); the log above names the stage and the fix")


def set_param(path: Path, key: tuple[str, str], value: Any) -> None:
    """Set `section.leaf` in params.yaml by editing its one line, keeping every comment and the
    order; the result is validated before it replaces the file."""
    section, leaf = key
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    text = yaml.safe_dump({leaf: value}, default_flow_style=True, width=10_000).strip()[1:-1]  # "leaf: value"
    start = next((i for i, line in enumerate(lines) if line.rstrip() == f"{section}:"), None)
    if start is None:
        lines += [f"{section}:\n", f"  {text}\n"]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i][0].isspace()
                    and not lines[i].startswith("#")), len(lines))
        at = next((i for i in range(start + 1, end) if lines[i].lstrip().startswith(f"{leaf}:")), None)
        if at is None:
            lines.insert(start + 1, f"  {text}\n")
        else:
            lines[at] = lines[at][: len(lines[at]) - len(lines[at].lstrip())] + text + "\n"
    new = path.with_name(f".{path.name}.edit")
    atomic_write_text(new, "".join(lines))
    try:
        load_params(new)
    except UserError:
        new.unlink()
        raise
    new.replace(path)
