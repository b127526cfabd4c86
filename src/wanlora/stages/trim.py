from wanlora.media.trim import run_stage
from wanlora.stages._common import WORKSPACE, load


def main() -> None:
    params = load()
    run_stage(params.datasets, WORKSPACE, WORKSPACE / "data/trimmed", index=WORKSPACE / "data/index/media.jsonl")
