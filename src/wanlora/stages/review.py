from wanlora.data.review import run_stage
from wanlora.stages._common import WORKSPACE


def main() -> None:
    run_stage(WORKSPACE, WORKSPACE / "data/review")
