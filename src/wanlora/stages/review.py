from wanlora.data.review import run_stage
from wanlora.data.split import read_split
from wanlora.pipeline import SPLIT_FILE
from wanlora.stages._common import WORKSPACE


def main() -> None:
    run_stage(WORKSPACE, WORKSPACE / "data/review", held_out=read_split(WORKSPACE / SPLIT_FILE).held_out_clips)
