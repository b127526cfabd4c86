from pathlib import Path

from wanlora.data.review import Inputs, run_stage
from wanlora.data.split import read_split
from wanlora.pipeline import (AUTOCAPTION_PROBLEMS, BUCKET_REPORT, CAPTION_MANIFEST, CAPTION_PROBLEMS, CLIPS,
                              INDEX_PROBLEMS, REVIEW, SAMPLES, SPLIT_FILE, TRIM_PROBLEMS)
from wanlora.stages._common import WORKSPACE


def inputs(workspace: Path) -> Inputs:
    """The review stage's declared deps under `workspace`."""
    w = Path(workspace)
    reports = (INDEX_PROBLEMS, TRIM_PROBLEMS, AUTOCAPTION_PROBLEMS, BUCKET_REPORT, CAPTION_PROBLEMS)
    return Inputs(clips=w / CLIPS, captions=w / CAPTION_MANIFEST, samples=w / SAMPLES,
                  problem_reports=tuple(w / r for r in reports))


def main() -> None:
    run_stage(WORKSPACE, inputs(WORKSPACE), WORKSPACE / REVIEW,
              held_out=read_split(WORKSPACE / SPLIT_FILE).held_out_clips)
