"""GPU-hours before and after: what a plan will cost, and what runs used.

A train run's cost is estimated per epoch, from (in this order):

1. the sweep's own history: sacct's elapsed time x allocated GPUs (CPUs on CPU partitions) of
   the finished runs with the same model, width, latent size, split layer, samples, data and
   batch size, divided by their epochs (a packed task's time is shared by its runs);
2. a calibration (``mode=calibrate``): a few timed training steps of each such model in this
   process, images per second -> seconds per epoch, recorded in ``<sweep>/calibration.json``
   with the device it ran on;
3. the time limit: ``cluster.time`` x devices, an upper bound, marked ``<=``.

Eval tasks use the history of the sweep's eval tasks per model and set, else ``eval_time``.
``cluster.budget_gpu_hours`` refuses a plan whose total (upper bounds included) is above it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dhm.core.config import ConfigError
from dhm.core.datasets import DATASETS
from dhm.core.fsutil import atomic_write_text
from hpc import stages
from hpc.plan import Plan
from hpc.schema import parse_time_minutes, ranks_per_node
from hpc.state import RunState, _units
from hpc.sweep import Run, sweep_dir

KEY_FIELDS = (
    "model.name",
    "model.width",
    "model.latent_dim",
    "model.vae_split_layer",
    "model.importance_num",
    "data.name",
    "train.batch_size",
)


_KEY_PATHS = tuple(tuple(dotted.split(".")) for dotted in KEY_FIELDS)


def model_key(run: Run) -> str:
    """What a run's cost is looked up by (runs of one key cost the same per epoch)."""
    c = run.cfg
    return " ".join(f"{leaf}={c[section][leaf]}" for section, leaf in _KEY_PATHS)


def train_images(run: Run) -> int:
    info = DATASETS[run.cfg.data.name]
    val = info.val_size if run.cfg.data.val_size is None else run.cfg.data.val_size
    return info.train_size - val


@dataclass
class Estimate:
    hours: float  # device-hours
    source: str  # history | calibration | time limit
    bound: bool  # an upper bound (from the time limit)


def _devices(cfg: Any) -> tuple[float, str]:
    c = cfg.cluster
    if c.gpus_per_node:
        return float(c.nodes * c.gpus_per_node), "GPU"
    return float(c.nodes * ranks_per_node(c) * c.cpus_per_task), "CPU"


def _history(states: list[RunState]) -> tuple[dict[str, list[float]], dict[tuple, list[float]]]:
    """({model key: device-seconds per epoch}, {(model key, set): device-seconds per task})."""
    train: dict[str, list[float]] = {}
    evals: dict[tuple, list[float]] = {}
    for st in states:
        key = model_key(st.run)
        if st.trained:
            cost = 0.0
            for a in st.attempts.get(("train", ""), []):
                for rec in [*a.history, a]:
                    cost += rec.elapsed_s * _units(rec.alloc_tres)[0] / max(1, len(a.runs))
            if cost > 0:
                train.setdefault(key, []).append(cost / st.run.cfg.train.epochs)
        for (stage, set_name), atts in st.attempts.items():
            if stage == "eval" and st.eval_done.get(set_name) and atts[-1].state == "COMPLETED":
                a = atts[-1]
                cost = a.elapsed_s * _units(a.alloc_tres)[0] / max(1, len(a.runs))
                if cost > 0:
                    evals.setdefault((key, set_name), []).append(cost)
    return train, evals


def calibration_path(cfg: Any) -> Path:
    return sweep_dir(cfg) / "calibration.json"


def estimate(cfg: Any, plan: Plan) -> dict[str, Any]:
    """{stage: (runs or tasks, Estimate)} for the plan's new work, the total, the unit, and
    ``per_run`` {run id: {piece: device-hours}} of its new work, a piece being ``train`` or
    ``eval:<set>`` (plan.json keeps each piece's first estimate: ``hpc.sweep.write_plan``)."""
    hist_train, hist_eval = _history(plan.states)
    calib = {}
    if calibration_path(cfg).exists():
        calib = json.loads(calibration_path(cfg).read_text()).get("models", {})
    devices, unit = _devices(cfg)
    limit_h = parse_time_minutes(cfg.cluster.time, "cluster.time") / 60
    eval_h = parse_time_minutes(cfg.cluster.eval_time, "cluster.eval_time") / 60
    eval_devices = float(cfg.cluster.eval_gpus or cfg.cluster.eval_cpus)
    resume = {st.run.run_id: st.resume_step for st in plan.states}
    packed = cfg.cluster.runs_per_task if isinstance(cfg.cluster.runs_per_task, int) else 1
    per_run: dict[str, dict[str, float]] = {}
    train_total, sources, bound = 0.0, set(), False
    for run, _ in plan.train:
        before = train_total
        key = model_key(run)
        epochs = run.cfg.train.epochs
        step = resume.get(run.run_id)
        if step:
            per_epoch = max(1, train_images(run) // run.cfg.train.batch_size)
            epochs = max(0.0, epochs - step / per_epoch)
        if key in hist_train:
            per = sum(hist_train[key]) / len(hist_train[key])
            train_total += per * epochs / 3600
            sources.add("history")
        elif key in calib:
            seconds = train_images(run) / calib[key]["images_per_s"] * epochs
            train_total += seconds * devices / 3600
            sources.add(f"calibration on {calib[key]['device']}")
        else:
            train_total += limit_h * devices / max(1, packed)  # a packed task shares its limit
            sources.add("time limit")
            bound = True
        per_run.setdefault(run.run_id, {})["train"] = train_total - before
    ev_total, ev_tasks, ev_bound = 0.0, 0, False
    groups = [(k, [r for r in runs]) for k, runs in plan.eval_after_train.items()]
    groups += [(k, [r for r, _ in runs]) for k, runs in plan.eval_now.items()]
    keys: dict[str, str] = {}  # run id -> model key, computed once per run
    for work, runs in groups:
        set_name = work.label  # the same work (set, checkpoint, variant) done before
        for run in runs:
            ev_tasks += 1
            if run.run_id not in keys:
                keys[run.run_id] = model_key(run)
            seen = hist_eval.get((keys[run.run_id], set_name))
            cost = sum(seen) / len(seen) / 3600 if seen else eval_h * eval_devices
            ev_bound = ev_bound or not seen
            ev_total += cost
            per_run.setdefault(run.run_id, {})[f"eval:{set_name}"] = cost
    return {
        "unit": unit,
        "train": (len(plan.train), Estimate(train_total, ", ".join(sorted(sources)) or "-", bound)),
        "eval": (ev_tasks, Estimate(ev_total, "time limit" if ev_bound else "history", ev_bound)),
        "total": Estimate(train_total + ev_total, "", bound or ev_bound),
        "per_run": per_run,
    }


def describe(est: dict[str, Any]) -> list[str]:
    unit = est["unit"]

    def fmt(e: Estimate) -> str:
        return f"{'<= ' if e.bound else ''}{e.hours:.2f} {unit}-hours"

    n_train, t = est["train"]
    n_eval, e = est["eval"]
    return [
        f"estimated cost: train {n_train} run(s) {fmt(t)} ({t.source}); eval {n_eval} task(s) "
        f"{fmt(e)} ({e.source}); total {fmt(est['total'])}"
        + (
            "; run mode=calibrate for an estimate instead of the time-limit bound"
            if est["total"].bound
            else ""
        ),
    ]


def check_budget(cfg: Any, est: dict[str, Any]) -> None:
    budget = cfg.cluster.budget_gpu_hours
    total = est["total"]
    if budget is not None and total.hours > budget:
        kind = "an upper bound from the time limits" if total.bound else "the estimate"
        raise ConfigError(
            f"cluster.budget_gpu_hours={budget:g}: this plan costs {total.hours:.2f} "
            f"{est['unit']}-hours ({kind}); select fewer runs (runs=..., where=...), raise the "
            "budget, or run mode=calibrate for a tighter estimate"
        )


def calibrate(cfg: Any, runs: list[Run], steps: int = 5, warmup: int = 2) -> Path:
    """Time a few training steps of each distinct model of the sweep in this process
    (``hpc.stages.calibrate_models``); write ``calibration.json`` (images per second, the
    device, and on a GPU the peak memory that ``runs_per_task=auto`` packs by)."""
    distinct = {model_key(run): run.cfg for run in reversed(runs)}
    out = stages.calibrate_models(dict(reversed(distinct.items())), steps, warmup)
    path = calibration_path(cfg)
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_text(path, json.dumps({"created": created, "models": out}, indent=1))
    return path


def refuse_if_over_limits(cfg: Any, info: Any, n_tasks: int) -> None:
    """MaxSubmitJobs: every pending array task counts; refuse a plan above the limit."""
    if info.max_submit is not None and n_tasks > info.max_submit:
        raise ConfigError(
            f"this plan queues {n_tasks} tasks, above MaxSubmitJobs={info.max_submit} of your "
            "association or QOS: pack runs (cluster.runs_per_task=N) or launch part of the "
            "sweep (runs=..., where=...)"
        )


def auto_runs_per_task(cfg: Any) -> tuple[int, str]:
    """``runs_per_task=auto``: (N, why). On a GPU partition, N = floor(0.8 x the GPU's memory
    / the largest peak memory one training step of the sweep's models took), from the
    calibration (``mode=calibrate`` on a node with that GPU), at most 8. Without a calibration,
    or on CPU partitions (where runs share cores, not an idle accelerator), 1."""
    if not cfg.cluster.gpus_per_node:
        return 1, "runs_per_task=auto: 1 on a CPU partition"
    path = calibration_path(cfg)
    models = json.loads(path.read_text()).get("models", {}) if path.exists() else {}
    peaks = [m["peak_mem_mb"] for m in models.values() if m.get("peak_mem_mb")]
    totals = [m["device_mem_mb"] for m in models.values() if m.get("device_mem_mb")]
    if not peaks or not totals:
        return 1, "runs_per_task=auto: 1 (no GPU calibration; run mode=calibrate on a GPU node)"
    n = max(1, min(8, int(0.8 * min(totals) // max(peaks))))
    return n, (
        f"runs_per_task=auto: {n} (peak {max(peaks):.0f} MB a run, "
        f"{min(totals):.0f} MB on the GPU, 80% used)"
    )
