import os

from wanlora.lock import die_with_parent, hold, launcher_pid
from wanlora.stages._common import WORKSPACE, load
from wanlora.train.distributed import relaunch_if_needed
from wanlora.train.loop import run_stage


def main() -> None:
    params = load()
    if "LOCAL_RANK" in os.environ:  # a rank started by torchrun (ours or the user's)
        die_with_parent()
        if int(os.environ.get("RANK", "0")) != 0:  # rank 0 holds the lock for its whole launch
            run_stage(params, WORKSPACE)
            return
    with hold(WORKSPACE / "scratch/train.lock", "training in this workspace", launcher_pid()):
        relaunch_if_needed(params.train.gpus, params.job.device)  # train.gpus > 1: rerun under torchrun
        run_stage(params, WORKSPACE)
