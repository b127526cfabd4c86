from wanlora.data.buckets import run_stage
from wanlora.stages._common import WORKSPACE, load


def main() -> None:
    params = load()
    run_stage(params.datasets, WORKSPACE / "data/trimmed/clips.jsonl", WORKSPACE / "data/buckets")
