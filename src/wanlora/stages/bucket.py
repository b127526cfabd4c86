from wanlora.data.buckets import run_stage
from wanlora.pipeline import BUCKETS, CLIPS
from wanlora.stages._common import WORKSPACE, load


def main() -> None:
    params = load()
    run_stage(params.datasets, WORKSPACE / CLIPS, WORKSPACE / BUCKETS)
