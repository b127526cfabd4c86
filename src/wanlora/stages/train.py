from wanlora.stages._common import WORKSPACE, load
from wanlora.train.loop import run_stage


def main() -> None:
    run_stage(load(), WORKSPACE)
