"""Where every run of a sweep stands, from its stored plan, the disk and Slurm.

One row per run: its stage; the stage's own newest task with its Slurm state and exit code;
why it ended or waits (the last line of the Python exception, Slurm's pending reason, or the
state); epoch/step and last loss (read from the end of metrics.csv, not the whole file); the
GPU-hours (CPU-hours on CPU partitions) its tasks used; and a log file that exists.
``mode=status runs=<id>`` shows one run in full: every attempt of every stage and the tail of
its log. ``run_reports`` gives the same reasons to the aggregation's ``problem`` column and the
states to the report.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from dhm.core.fsutil import tail
from dhm.core.layout import ATTEMPTS_LOG, METRICS_LOG, plan_estimates
from hpc import ledger
from hpc.ledger import Attempt
from hpc.plan import RunState, read_states, run_states
from hpc.sweep import Run, sweep_dir


def progress(run_dir: Path | str) -> tuple[str, str] | None:
    """(epoch/step reached, last loss) from the last rows of metrics.csv ('-' when no row has
    a loss yet; None when there is no such file). Reads its first line and at most 64 KiB from
    its end (4 KiB first: a row is ~100 bytes), whatever its length."""
    path = os.path.join(run_dir, "logs", METRICS_LOG)
    try:
        with open(path, "rb") as f:
            header = f.readline().decode("utf-8", errors="replace")
            for window in (4096, 64 * 1024):
                found = _last_loss(header, tail(f, 40, max_bytes=window))
                if found is not None:
                    return found
    except OSError:
        return None
    return "-", "-"


def _last_loss(header: str, lines: list[str]) -> tuple[str, str] | None:
    fields = next(csv.reader([header]), [])
    for line in reversed(lines):
        if line.startswith("step,"):
            continue
        row = dict(zip(fields, next(csv.reader([line]), []), strict=False))
        if row.get("loss"):
            try:
                return f"{row['epoch']}/{row['step']}", f"{float(row['loss']):.4g}"
            except (KeyError, ValueError):
                continue
    return None


@functools.lru_cache(maxsize=256)
def _units(tres: str) -> tuple[float, str]:
    """(GPUs, 'GPU') or (CPUs, 'CPU') of an AllocTRES string such as cpu=8,gres/gpu=2."""
    gpus = re.search(r"gres/gpu(?::[^=,]+)?=(\d+)", tres or "")
    if gpus and int(gpus.group(1)):
        return float(gpus.group(1)), "GPU"
    cpus = re.search(r"cpu=(\d+)", tres or "")
    return (float(cpus.group(1)) if cpus else 0.0), "CPU"


def used_hours(st: RunState) -> tuple[float, str]:
    """Device-hours this run's tasks used so far (a packed task's share), and the unit."""
    total, unit = 0.0, "GPU"
    for atts in st.attempts.values():
        for a in atts:
            for rec in [*a.history, a]:
                n, unit = _units(rec.alloc_tres)
                total += rec.elapsed_s * n / 3600 / max(1, len(a.runs))
    return total, unit


def _own_attempts(run_dir: Path | str) -> list[dict[str, Any]]:
    """The attempts the run recorded itself (logs/train_attempts.jsonl; [] without one)."""
    out = []
    for line in tail(os.path.join(run_dir, "logs", ATTEMPTS_LOG), 50):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _bucket(stage: str) -> str:
    """The stage as counted in the footer: done, failed, training, train pending, evaluating..."""
    if stage.endswith("failed"):
        return "failed"
    if stage.startswith("eval "):
        return "evaluating"
    return stage


def describe(st: RunState) -> dict[str, Any]:
    """The run's stage, Slurm state, reason and log (the report's and status's row)."""
    done = sum(st.eval_done.values())
    sets = len(st.eval_done)
    train = st.last("train")
    evals = [(s, st.last("eval", s)) for s in st.eval_done]
    bad_eval = next(
        (
            (s, a)
            for s, a in evals
            if a and not st.eval_done[s] and not a.active and a.state != "COMPLETED"
        ),
        None,
    )
    run_dir = st.run.cfg.run_dir
    own = _own_attempts(run_dir)
    packed_failure = next((o for o in reversed(own) if o.get("outcome") == "failed"), None)
    relevant: Attempt | None = train
    if st.trained and done == sets:
        stage, why = "done", ""
    elif st.trained:
        active = st.active("eval", None)
        if active:
            stage, relevant, why = f"eval {done}/{sets}", active, active.reason
        elif bad_eval:
            stage, relevant = f"eval failed {done}/{sets}", bad_eval[1]
            why = f"{bad_eval[0]}: {bad_eval[1].reason}"
        else:
            stage, why = f"eval {done}/{sets}", "evaluation not submitted (relaunch)"
    elif st.active("train"):
        a = st.active("train")
        stage, relevant, why = (
            ("train pending" if a.state == "PENDING" else "training"),
            a,
            a.reason,
        )
    elif train is not None and train.state != "COMPLETED" and not train.active:
        stage, why = "train failed", train.reason
    elif train is not None and packed_failure:
        stage, why = "train failed", f"exception: {packed_failure.get('exception')}"
    else:
        stage, why = "not started", "not submitted yet" if train is None else train.reason
    slurm = f"{relevant.state} {relevant.exit_code}".strip() if relevant else "-"
    log = ""
    if relevant is not None:
        log = relevant.err_log if stage.endswith("failed") and relevant.err_log else relevant.log
    reached = progress(run_dir)
    if not log:
        log = "-" if reached is None else os.path.join(run_dir, "logs", METRICS_LOG)
    step, loss = reached or ("-", "-")
    hours, unit = used_hours(st)
    return {
        "stage": stage,
        "slurm": slurm,
        "job": relevant.job_id if relevant else "-",
        "reason": why,
        "log": log,
        "step": step,
        "loss": loss,
        "hours": hours,
        "unit": unit,
        "active": bool(st.active("train") or st.active("eval", None)),
        "log_tail": ledger.log_tail(relevant) if relevant and stage.endswith("failed") else [],
        "attempt": relevant,
    }


_DOTTED_ERROR = re.compile(
    r"^(exception: )(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\b)"
)


def _short_reason(reason: str, width: int = 100) -> str:
    """The table's cell for a reason: an exception's class without its module path (the full
    line is in the one-run view), cut to ``width`` characters."""
    reason = _DOTTED_ERROR.sub(r"\1\2", reason)
    return reason if len(reason) <= width else reason[: width - 3] + "..."


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def status_lines(
    cfg: Any, runs: list[Run], query: bool, estimates: dict[str, float] | None = None
) -> tuple[list[str], dict[str, dict]]:
    """The status table (one row per run), its footer, and the states for the report;
    ``estimates``: the stored plan's device-hours per run (read from plan.json if None)."""
    states, everything = read_states(cfg, runs, query, check_stale=False)
    infos = {st.run.run_id: describe(st) for st in states}
    rows, counts = [], {}
    if estimates is None:
        estimates = plan_estimates(sweep_dir(cfg))
    for st in states:
        i = infos[st.run.run_id]
        key = _bucket(i["stage"])
        counts[key] = counts.get(key, 0) + 1
        why = _short_reason(i["reason"])
        est = estimates.get(st.run.run_id)
        rows.append(
            (
                st.run.run_id,
                i["stage"],
                i["slurm"],
                i["step"],
                i["loss"],
                f"{i['hours']:.2f}",
                "-" if est is None else f"{est:.2f}",
                why or "-",
                i["log"],
            )
        )
    unit = "GPU" if cfg.cluster.gpus_per_node else "CPU"
    lines = _table(
        (
            "run_id",
            "stage",
            "slurm",
            "epoch/step",
            "loss",
            f"{unit}-h",
            f"{unit}-h est",
            "why",
            "log",
        ),
        rows,
    )
    from dhm.core.layout import summary_complete

    done, why = summary_complete(sweep_dir(cfg), [r.run_id for r in runs])
    agg = ledger.latest(everything).get(("aggregate", "", ""))
    if agg is not None:
        why += f"; aggregate job {agg.job_id} {agg.state}" + (
            f": {agg.reason}" if agg.reason else ""
        )
        if agg.state == "FAILED" and agg.err_log:
            why += f" (log {agg.err_log})"
    parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    total = sum(i["hours"] for i in infos.values())
    lines.append(f"{len(states)} runs: {parts}; {why}; {total:.2f} {unit}-hours used")
    return lines, {rid: {k: v for k, v in i.items() if k != "attempt"} for rid, i in infos.items()}


def detail_lines(cfg: Any, run: Run, query: bool) -> list[str]:
    """Everything about one run: settings, every attempt of every stage, the log's tail."""
    (st,) = run_states(cfg, [run], query_slurm=query)
    info = describe(st)
    settings = " ".join(f"{k}={v}" for k, v in run.overrides.items()) or "(base config)"
    lines = [
        f"run {run.run_id}: {settings}",
        f"  folder {run.run_dir}",
        f"  stage {info['stage']}: {info['reason'] or 'ok'}",
        f"  trained: {st.trained}; resume step: {st.resume_step}; sets: "
        + ", ".join(f"{s} {'done' if d else 'missing'}" for s, d in st.eval_done.items()),
    ]
    rows = []
    for (stage, set_name), atts in sorted(st.attempts.items()):
        for a in atts:
            for k, rec in enumerate([*a.history, a]):
                last = k == len(a.history)
                rows.append(
                    (
                        f"{stage}{':' + set_name if set_name else ''}",
                        a.job_id,
                        a.submitted if k == 0 else "(requeued)",
                        rec.state,
                        rec.exit_code or "-",
                        f"{rec.elapsed_s}s",
                        rec.nodes or "-",
                        (a.reason if last else rec.reason) or "-",
                        (a.err_log or a.log) if last else "-",
                    )
                )
    if rows:
        lines += [
            "",
            *_table(
                ("stage", "job", "submitted", "state", "exit", "elapsed", "nodes", "why", "log"),
                rows,
            ),
        ]
    own = _own_attempts(run.run_dir)
    if own:
        lines += ["", "train attempts recorded by the run (logs/train_attempts.jsonl):"]
        lines += [
            f"  {o.get('time')} job {o.get('job')} restart {o.get('restart')} on "
            f"{o.get('host')}: {o.get('outcome')}"
            + (f" at step {o['step']}" if o.get("step") is not None else "")
            + (f": {o['exception']}" if o.get("exception") else "")
            for o in own
        ]
    a = info["attempt"]
    if a is not None:
        log_lines = ledger.log_tail(a, 15)
        if log_lines:
            lines += ["", f"tail of {a.err_log or a.log}:", *("  " + ln for ln in log_lines)]
    return lines


def run_reports(cfg: Any, runs: list[Run] | None = None, query: bool = True):
    """({run id: reason}, {run id: state dict}) for the aggregation and the report."""
    from omegaconf import OmegaConf

    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    if runs is None:
        from hpc.sweep import plan_path, read_plan, stored_runs

        plan = read_plan(plan_path(cfg))
        runs = stored_runs(plan, plan_path(cfg)) if plan else []
    states = run_states(cfg, runs, query_slurm=query and cfg.cluster.name == "slurm")
    infos = {st.run.run_id: describe(st) for st in states}
    reasons = {}
    for rid, i in infos.items():
        if i["stage"] not in ("done",) and i["reason"]:
            reasons[rid] = f"{i['stage']} ({i['slurm']}): {i['reason']}"
    return reasons, {
        rid: {k: v for k, v in i.items() if k != "attempt"} for rid, i in infos.items()
    }
