"""Every Slurm task's entry: ``python <snapshot>/hpc/task.py <submitit folder>``.

Started by path, not with ``-m``: Python then puts this file's folder first on ``sys.path``
(never the working directory, which is usually the user's checkout), and the first lines below
replace it by the snapshot's root, so every import of the task comes from the code that was
launched (``hpc.snapshot``), through every requeue (the same script runs again).

Then it hands over to submitit's own entry. A launch killed between its sbatch call and
submitit's renaming of the task's pickle leaves the pickle under its pending name
(``pending_<DHM_TOKEN>_<task>.pkl``, ``hpc.slurm``): the task renames it itself, so a job the
launch never recorded still runs what it was submitted with.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # this file's folder out (absent under -P), the snapshot's root first
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [ROOT, *(p for p in sys.path if os.path.abspath(p or ".") != _HERE)]


def claim_pickle(folder: str, env: dict[str, str]) -> None:
    """Rename this task's pending pickle to the name submitit reads, if the launch did not."""
    token = env.get("DHM_TOKEN")
    job = env.get("SLURM_ARRAY_JOB_ID")
    task = env.get("SLURM_ARRAY_TASK_ID")
    name = f"{job}_{task}" if job and task else env.get("SLURM_JOB_ID", "")
    target = os.path.join(folder, f"{name}_submitted.pkl")
    if not token or not name or os.path.exists(target):
        return
    try:
        os.rename(os.path.join(folder, f"pending_{token}_{task or 0}.pkl"), target)
    except FileNotFoundError:
        pass  # the launch, or another rank of this task, renamed it first


def main() -> None:
    from submitit.core.submission import submitit_main

    claim_pickle(sys.argv[1], dict(os.environ))
    submitit_main()


if __name__ == "__main__":
    main()
