from wanlora.export.stage import run_stage
from wanlora.pipeline import BEST, EXPORTS, LORA
from wanlora.stages._common import WORKSPACE, load


def main() -> None:
    run_stage(load(), WORKSPACE / LORA, WORKSPACE / BEST, WORKSPACE / EXPORTS)
