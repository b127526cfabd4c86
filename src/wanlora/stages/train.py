import os

from wanlora.lock import hold
from wanlora.stages._common import WORKSPACE, load
from wanlora.train.distributed import relaunch_if_needed
from wanlora.train.loop import run_stage


def main() -> None:
    params = load()
    if "LOCAL_RANK" in os.environ:  # a rank started by torchrun: the launching process holds the lock
        run_stage(params, WORKSPACE)
        return
    with hold(WORKSPACE / "scratch/train.lock", "training in this workspace"):
        relaunch_if_needed(params.train.gpus, params.job.device)  # train.gpus > 1: rerun under torchrun
        run_stage(params, WORKSPACE)
