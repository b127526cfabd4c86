from wanlora.pipeline import CHECK_MARKER
from wanlora.stages._common import WORKSPACE, load
from wanlora.workspace import check_stage


def main() -> None:
    load()  # validates every key of params.yaml: a typo stops `dvc repro` here, before any work
    check_stage(WORKSPACE, WORKSPACE / CHECK_MARKER)
