"""One packed run: ``python <tree>/hpc/packed.py <run.yaml> <limits JSON> [stage_to]``.

Started by path from the tree its parent task imports (the launch's code snapshot on Slurm):
Python puts this file's folder first on ``sys.path``, replaced below by the tree's root, so
the child imports what its parent imports, never the working directory.

Started by ``hpc.stages.train_packed`` as a child of a train task that holds several runs. It
trains one run with the parent's Slurm environment (its own MASTER_PORT under DDP, its share of
the task's threads) and exits 0 when done, ``STOPPED_EXIT`` after checkpointing on USR2 (the
parent requeues the task), 1 after an exception (recorded in the run's train_attempts.jsonl).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

if __name__ == "__main__":  # this file's folder out (absent under -P), the tree's root first
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]


def main(argv: list[str]) -> int:
    from dhm.core.config import from_yaml
    from dhm.training.train import StopRequest, TrainingStopped, train
    from hpc import stages

    text = Path(argv[0]).read_text()
    stage_to = argv[2] if len(argv) > 2 else None
    cfg = from_yaml(text)
    run_dir = Path(cfg.run_dir)
    threads = int(os.environ.get("OMP_NUM_THREADS", 0))
    if threads:
        import torch

        torch.set_num_threads(threads)
    stop = StopRequest()
    signal.signal(signal.SIGUSR2, lambda *_: setattr(stop, "requested", True))
    stages.record_environment(run_dir, "train")
    if stage_to:
        cfg.data.root = stages.stage_data(cfg.data.root, stage_to, stages.node_rank())
    try:
        stages.require_cuda("the train", "train.device", cfg.train.device)
        train(cfg, stop)
    except TrainingStopped as err:
        stages.record_attempt(run_dir, outcome="stopped", step=err.step, packed=True)
        return stages.STOPPED_EXIT
    except Exception as err:
        traceback.print_exc()
        stages.record_attempt(
            run_dir,
            outcome="failed",
            packed=True,
            exception=f"{type(err).__name__}: {err}".splitlines()[0],
        )
        return 1
    finally:
        if stages.in_slurm_job():
            stages.end_process_group()
    stages.record_attempt(run_dir, outcome="completed", packed=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
