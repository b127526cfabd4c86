from wanlora.export.stage import run_stage
from wanlora.stages._common import WORKSPACE, load


def main() -> None:
    run_stage(load(), WORKSPACE, WORKSPACE / "data/exports")
