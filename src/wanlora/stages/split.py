from wanlora.data.split import run_stage
from wanlora.report import console
from wanlora.stages._common import WORKSPACE, load


def main() -> None:
    split = run_stage(load(), WORKSPACE)
    console.print(f"split: validation on {split['basis'].replace('_', ' ')}: {split['reason']}")
