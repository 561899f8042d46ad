"""The modes that read a stored sweep by its name: status, cancel and report.

    python launch.py sweep.name=alpha_beta mode=status             # one row per run
    python launch.py sweep.name=alpha_beta mode=status runs=[ab12] # one run in full
    python launch.py sweep.name=alpha_beta mode=cancel
    python launch.py sweep.name=alpha_beta mode=report             # rewrite summary/report.html

They need the stored plan, the disk and Slurm's answers, nothing of the planning or submission
code (``hpc.launcher`` imports this module for the stored sweep; never the other way).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from dhm.core.layout import estimates_of
from dhm.report.page import write_report
from hpc import efficiency, ledger, lock
from hpc.schema import check_launch, on_slurm
from hpc.state import run_reports
from hpc.status import detail_lines, status_lines
from hpc.sweep import Run, outside_runs, plan_path, select, stored_sweep, sweep_dir


def cancel(cfg: Any, runs: list[Run], everything: bool) -> int:
    """scancel the tasks of the selected runs that are pending or running (and the aggregate
    job when the whole sweep is selected)."""
    wanted = {r.run_id for r in runs}
    ids = sorted(
        {
            a.job_id
            for a in ledger.attempts(cfg)
            if a.active and (set(a.runs) & wanted or (everything and a.stage == "aggregate"))
        }
    )
    ledger.scancel(ids)
    if ids:
        ledger.record_cancel(cfg, ids, "mode=cancel")
    print(f"cancelled {len(ids)} task(s)" + (f": {' '.join(ids)}" if ids else ""))
    return 0


def main(cfg: DictConfig, argv: list[str]) -> int:
    """status | cancel | report: from the stored plan, by the sweep's name."""
    check_launch(cfg)
    cfg, all_runs, stored = stored_sweep(cfg, argv)
    outside = outside_runs(stored, plan_path(cfg))
    runs = select(cfg, [*all_runs, *outside] if cfg.runs else all_runs)  # named: may be outside
    whole = {r.run_id for r in runs} == {r.run_id for r in all_runs}
    query = on_slurm(cfg)
    if cfg.mode == "cancel":
        with lock.held(sweep_dir(cfg), "launch.py mode=cancel", cfg.lock_wait_s):
            ledger.adopt(cfg)  # jobs of a launch that died before recording them
            return cancel(cfg, runs, whole)
    if query and cfg.mode == "status":
        try:  # the ledger is written under the lock only: adopt when no command holds it
            with lock.held(sweep_dir(cfg), "launch.py mode=status", 0, quiet=True):
                ledger.adopt(cfg)
        except (lock.SweepLocked, OSError):
            pass  # the command holding it adopts them itself (or the folder is read-only)
    if cfg.mode == "report":
        _, states = run_reports(cfg, runs, query)
        print(f"report: {write_report(sweep_dir(cfg), states=states, plan=stored)}")
        return 0
    one = runs[0].run_id if cfg.runs and len(runs) == 1 else None
    subs = ledger.submissions(cfg) if query and (whole or one) else []
    steps = efficiency.ask(subs) if subs else None  # answers while status reads the disk
    if one is not None:
        lines = detail_lines(cfg, runs[0], query)
    else:
        lines, states = status_lines(cfg, runs, query, estimates_of(stored),
                                     outside if whole else [])  # fmt: skip
    if steps is not None:
        try:
            uses = efficiency.stage_uses(subs, efficiency.parse_steps(steps.answer()), one)
        except ledger.SlurmError as err:
            lines.append(f"efficiency: not known ({err})")
        else:
            lines += efficiency.lines(uses)
            if one is None:
                efficiency.write(sweep_dir(cfg), uses)
    print("\n".join(lines))
    if one is not None:
        return 0
    if whole and sweep_dir(cfg).exists():
        print(f"report: {write_report(sweep_dir(cfg), states=states, plan=stored)}")
    return 0
