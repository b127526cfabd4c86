from pathlib import Path

from wanlora.evaluate.stage import Inputs, run_stage
from wanlora.pipeline import (CAPTION_MANIFEST, CAPTION_PROBLEMS, CLIPS, EVAL, HISTOGRAM, LATENT_CACHE, LORA, SAMPLES,
                              SPLIT_FILE, TEXT_CACHE, TRAIN_LIVE)
from wanlora.stages._common import WORKSPACE, load


def inputs(workspace: Path) -> Inputs:
    """The evaluate stage's declared deps under `workspace`."""
    w = Path(workspace)
    return Inputs(lora=w / LORA, train_live=w / TRAIN_LIVE, text_cache=w / TEXT_CACHE, latent_cache=w / LATENT_CACHE,
                  samples=w / SAMPLES, captions=w / CAPTION_MANIFEST, split=w / SPLIT_FILE, histogram=w / HISTOGRAM,
                  clips=w / CLIPS, caption_problems=w / CAPTION_PROBLEMS)


def main() -> None:
    run_stage(load(), WORKSPACE, inputs(WORKSPACE), WORKSPACE / EVAL)
