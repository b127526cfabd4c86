from wanlora.media.trim import run_stage
from wanlora.pipeline import MEDIA_INDEX, TRIMMED
from wanlora.stages._common import WORKSPACE, load


def main() -> None:
    params = load()
    run_stage(params.datasets, WORKSPACE, WORKSPACE / TRIMMED, index=WORKSPACE / MEDIA_INDEX)
