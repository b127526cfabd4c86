from wanlora.data.scan import run_stage
from wanlora.pipeline import INDEX
from wanlora.stages._common import WORKSPACE, load


def main() -> None:
    params = load()
    run_stage(params.datasets, WORKSPACE, WORKSPACE / INDEX)
