from wanlora.data.split import run_stage
from wanlora.pipeline import CAPTION_MANIFEST, SAMPLES, SPLIT_FILE
from wanlora.report import console
from wanlora.stages._common import WORKSPACE, load


def main() -> None:
    split = run_stage(load(), WORKSPACE / SAMPLES, WORKSPACE / CAPTION_MANIFEST, WORKSPACE / SPLIT_FILE)
    console.print(f"split: validation on {split['basis'].replace('_', ' ')}: {split['reason']}")
