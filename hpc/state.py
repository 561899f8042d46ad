"""Observing a sweep: each run's state on disk (trained? resumable? which sets evaluated?) and
in Slurm (every attempt, from the ledger and sacct/squeue), and the one description of it that
status's rows and footer, the summary's ``problem`` column, the manifest and the report show.

Deciding what to do about a state is ``hpc.plan``'s; showing it is ``hpc.status``'s.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dhm.core import checkpoint as ckpt_io
from dhm.core import layout
from dhm.core import variants as V
from dhm.core.fsutil import tail
from dhm.core.layout import ATTEMPTS_LOG, METRICS_LOG
from hpc import ledger
from hpc.file_facts import FileFacts
from hpc.ledger import Attempt
from hpc.schema import on_slurm
from hpc.sweep import Run, plan_path, read_plan, stored_runs, sweep_dir


@dataclass
class RunState:
    run: Run
    trained: bool
    final_problem: str | None  # final.pt exists but is truncated or corrupt
    resume_step: int | None  # newest complete step checkpoint (None when trained: no resume)
    bad_resume: Path | None  # the newest step checkpoint, when it is not complete
    eval_done: dict[str, bool]  # unit (set, checkpoint, variant: variants.unit_label) -> complete
    roles: dict[str, str]  # unit -> id | val | ood
    parts: dict[str, V.SetParts] = field(default_factory=dict)  # unit -> its parts' state
    attempts: dict[tuple[str, str], list[Attempt]] = field(default_factory=dict)  # (stage, set)

    def last(self, stage: str, set_name: str = "") -> Attempt | None:
        found = self.attempts.get((stage, set_name))
        return found[-1] if found else None

    def active(self, stage: str, set_name: str | None = "") -> Attempt | None:
        """The attempt of ``stage`` (for ``set_name``; None: any set) that is in flight."""
        for (st, s), atts in self.attempts.items():
            if st == stage and set_name in (None, s) and atts[-1].active:
                return atts[-1]
        return None


def run_states(
    cfg: Any,
    runs: list[Run],
    query_slurm: bool,
    facts: FileFacts | None = None,
) -> list[RunState]:
    """Each run's state on disk (dhm answers: trained? evaluated?) and in Slurm (every attempt;
    sacct and squeue answer while the disk is read). ``facts``: what was read inside files, for
    the caller to save (None: kept here, saved at once)."""
    return read_states(cfg, runs, query_slurm, facts)[0]


def read_states(
    cfg: Any,
    runs: list[Run],
    query_slurm: bool,
    facts: FileFacts | None = None,
) -> tuple[list[RunState], list[Attempt]]:
    """(``run_states``, every attempt the ledger lists: the aggregate job's too). A run's own
    attempts are attached on Slurm, or when Slurm is queried."""
    asked = ledger.ask(cfg) if query_slurm else None  # answering while the disk is read
    try:
        states = disk_states(cfg, runs, facts)
        everything = ledger.attempts(cfg, query=query_slurm, asked=asked)
    finally:
        if asked is not None:
            asked.close()
    attach(states, everything if query_slurm or on_slurm(cfg) else [])
    return states, everything


def unit_parts(
    run: Run,
    top: tuple[str, ...] | None,
    facts: FileFacts,
    settings: dict[str, Any] | None = None,
    name: str | None = None,
) -> dict[str, V.SetParts]:
    """{unit label: its parts' state} of a run under its eval settings (or ``settings``, those
    of variant ``name``): ``top``, the names in its eval/ folder (None: listed here);
    ``facts`` reads old-layout shards' ids."""
    s = V.settings_of(run.cfg.eval) if settings is None else settings
    listing = V.eval_listing(run.cfg.run_dir, top)
    sized = V._Attrs(data=run.cfg.data, eval=V._Attrs(max_images=s["max_images"]))
    found = V.set_parts(
        run.cfg, s, listing, facts.eval_id, lambda n, r: layout.expected_size(sized, n, r)
    )
    variant = run.cfg.eval.get("variant") if name is None else name
    return {V.unit_label(p.set_name, p.checkpoint, variant): p for p in found}


def variant_states(st: RunState, variants: list[V.Variant], facts: FileFacts) -> dict[str, str]:
    """{variant name: done | running | missing | k/n sets} of one run (status)."""
    out = {}
    for v in variants:
        parts = unit_parts(st.run, None, facts, v.settings, v.name)
        done = sum(p.complete for p in parts.values())
        if done == len(parts):
            out[v.name] = "done"
        elif any(st.active("eval", label) for label in parts):
            out[v.name] = "running"
        else:
            out[v.name] = "missing" if not done else f"{done}/{len(parts)}"
    return out


def disk_states(cfg: Any, runs: list[Run], facts: FileFacts | None = None) -> list[RunState]:
    """Each run's state on disk, without its Slurm attempts (``attach`` adds them)."""
    disk = layout.scan_runs([run.cfg.run_dir for run in runs])
    save = facts is None
    facts = FileFacts(sweep_dir(cfg)) if facts is None else facts
    out = []
    for run in runs:
        files = disk[run.cfg.run_dir]
        ckpt_dir = os.path.join(run.cfg.run_dir, "checkpoints")
        final = os.path.join(ckpt_dir, ckpt_io.FINAL_NAME)
        has_final = ckpt_io.FINAL_NAME in files.checkpoints
        trained = has_final and facts.complete(final)
        good = bad = None
        if not trained and files.checkpoints:
            steps = ckpt_io.step_checkpoints(ckpt_dir, files.checkpoints)
            good = ckpt_io.newest_complete(ckpt_dir, files.checkpoints, facts.complete)
            bad = steps[-1][1] if steps and (good is None or steps[-1][0] != good[0]) else None
        parts = unit_parts(run, files.shards, facts)
        state = RunState(
            run=run,
            trained=trained,
            final_problem=None if trained or not has_final else "truncated or corrupt",
            resume_step=good[0] if good else None,
            bad_resume=bad,
            eval_done={k: p.complete for k, p in parts.items()},
            roles={k: p.role for k, p in parts.items()},
            parts=parts,
        )
        out.append(state)
    if save:
        facts.save()
    return out


def attach(states: list[RunState], atts: list[Attempt]) -> None:
    """Give each run state its attempts, by (stage, set), oldest first."""
    by_run: dict[str, dict[tuple[str, str], list[Attempt]]] = {}
    for a in atts:
        for rid in a.runs:
            by_run.setdefault(rid, {}).setdefault((a.stage, a.set_name), []).append(a)
    for st in states:
        st.attempts = by_run.get(st.run.run_id, {})


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


def own_attempts(run_dir: Path | str) -> list[dict[str, Any]]:
    """The attempts the run recorded itself (logs/train_attempts.jsonl; [] without one)."""
    out = []
    for line in tail(os.path.join(run_dir, "logs", ATTEMPTS_LOG), 50):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# Each run is in exactly one of these (status's footer counts them; the report colours them).
BUCKETS = ("done", "failed", "training", "train pending", "evaluating", "eval missing",
           "not started")  # fmt: skip


@dataclass
class Stage:
    """Where one run stands: ``text`` for its row, ``bucket`` (one of BUCKETS) for counts,
    ``why`` in words, and the attempt the row's Slurm state and log come from."""

    text: str
    bucket: str
    why: str
    attempt: Attempt | None


def _failed_eval(st: RunState) -> tuple[str, Attempt] | None:
    """(set, attempt) of the first set whose last eval attempt ended badly and is missing."""
    for s, done in st.eval_done.items():
        a = st.last("eval", s)
        if a and not done and not a.active and a.state != "COMPLETED":
            return s, a
    return None


def _eval_stage(st: RunState) -> Stage:
    done, sets = sum(st.eval_done.values()), len(st.eval_done)
    if done == sets:
        return Stage("done", "done", "", st.last("train"))
    if active := st.active("eval", None):
        return Stage(f"eval {done}/{sets}", "evaluating", active.reason, active)
    if failed := _failed_eval(st):
        set_name, a = failed
        return Stage(f"eval failed {done}/{sets}", "failed", f"{set_name}: {a.reason}", a)
    missing = ", ".join(s for s, d in st.eval_done.items() if not d)
    why = f"{missing} not evaluated; evaluation not submitted (relaunch)"
    return Stage(f"eval {done}/{sets}", "eval missing", why, st.last("train"))


def _train_stage(st: RunState, own: list[dict[str, Any]]) -> Stage:
    train = st.last("train")
    if a := st.active("train"):
        pending = a.state == "PENDING"
        return Stage("train pending" if pending else "training",
                     "train pending" if pending else "training", a.reason, a)  # fmt: skip
    if train is not None and train.state != "COMPLETED":
        return Stage("train failed", "failed", train.reason, train)
    # The run's own record: a packed child's exception (its task completed), or a failure in
    # this process (cluster=local, where Slurm has no attempt).
    last = own[-1] if own else None
    if last is not None and last.get("outcome") == "failed":
        return Stage("train failed", "failed", f"exception: {last.get('exception')}", train)
    why = "not submitted yet" if train is None else train.reason
    return Stage("not started", "not started", why, train)


def stage_of(st: RunState, own: list[dict[str, Any]] | None = None) -> Stage:
    """Where the run stands (``own``: its train_attempts.jsonl records, read if None)."""
    if st.trained:
        return _eval_stage(st)
    return _train_stage(st, own_attempts(st.run.cfg.run_dir) if own is None else own)


def describe(st: RunState) -> dict[str, Any]:
    """The run's stage, Slurm state, reason and log: the row that status, the summary's
    ``problem`` column and the report all show."""
    stage = stage_of(st)
    relevant, failed = stage.attempt, stage.bucket == "failed"
    run_dir = st.run.cfg.run_dir
    log = ""
    if relevant is not None:
        log = relevant.err_log if failed and relevant.err_log else relevant.log
    reached = progress(run_dir)
    if not log:
        log = "-" if reached is None else os.path.join(run_dir, "logs", METRICS_LOG)
    step, loss = reached or ("-", "-")
    hours, unit = used_hours(st)
    return {
        "stage": stage.text,
        "bucket": stage.bucket,
        "slurm": f"{relevant.state} {relevant.exit_code}".strip() if relevant else "-",
        "job": relevant.job_id if relevant else "-",
        "reason": stage.why,
        "log": log,
        "step": step,
        "loss": loss,
        "hours": hours,
        "unit": unit,
        "active": bool(st.active("train") or st.active("eval", None)),
        "log_tail": ledger.log_tail(relevant) if relevant and failed else [],
        "attempt": relevant,
    }


def plain_states(infos: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The descriptions without their Attempt objects (JSON-ready, for the report)."""
    return {rid: {k: v for k, v in i.items() if k != "attempt"} for rid, i in infos.items()}


def stored_sweep_runs(cfg: Any) -> list[Run]:
    """The runs of the sweep's stored plan ([] before its first launch)."""
    plan = read_plan(plan_path(cfg))
    return stored_runs(plan, plan_path(cfg)) if plan else []


def run_reports(cfg: Any, runs: list[Run] | None = None, query: bool = True):
    """({run id: reason}, {run id: state dict}) for the aggregation and the report: every run
    that is not done has a reason (the summary never counts it ok)."""
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    if runs is None:
        runs = stored_sweep_runs(cfg)
    states = run_states(cfg, runs, query_slurm=query and on_slurm(cfg))
    infos = {st.run.run_id: describe(st) for st in states}
    reasons = {
        rid: f"{i['stage']} ({i['slurm']}): {i['reason']}"
        for rid, i in infos.items()
        if i["bucket"] != "done"
    }
    return reasons, plain_states(infos)
