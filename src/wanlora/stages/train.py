from wanlora.stages._common import WORKSPACE, load
from wanlora.train.distributed import relaunch_if_needed
from wanlora.train.loop import run_stage


def main() -> None:
    params = load()
    relaunch_if_needed(params.train.gpus, params.job.device)  # train.gpus > 1: rerun under torchrun
    run_stage(params, WORKSPACE)
