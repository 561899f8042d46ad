"""main(cfg): validate -> plan -> submit | status | cancel | aggregate.

    python launch.py sweep=alpha_beta cluster=slurm      # submit the study, return at once
    python launch.py sweep=alpha_beta mode=dry_run       # the plan and sbatch scripts, no submit
    python launch.py sweep=alpha_beta mode=status        # one row per run
    python launch.py sweep=demo cluster=local            # the same pipeline in this process

Usage errors (an unknown group option, key or type while composing; a value outside what is
allowed; a cluster profile Slurm would refuse) print one line and exit with status 2 before
anything is submitted or written.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dhm.checkpoint import CheckpointError
from dhm.config import ConfigError
from dhm.data import DataError
from hpc import ledger, slurm
from hpc.schema import MODES, register_configs
from hpc.stages import AggregateStage, EvalStage, NoOp, TrainStage
from hpc.sweep import Run, expand, sweep_dir, write_plan

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
USAGE_ERROR = 2
FAILED_STATES = {"FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                 "BOOT_FAIL", "DEADLINE"}  # fmt: skip


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed, typed config for command-line overrides (raises Hydra/OmegaConf errors)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@dataclass
class Plan:
    """What a launch will do: per run a list of (action, reason), and the arrays to submit."""

    states: list[ledger.RunState]
    actions: dict[str, list[str]] = field(default_factory=dict)  # run_id -> lines
    train: list[Run] = field(default_factory=list)
    # (set, role) -> runs; a set name can be in-distribution for some runs and OOD for others.
    eval_after_train: dict[tuple[str, str], list[Run]] = field(default_factory=dict)
    eval_now: dict[tuple[str, str], list[Run]] = field(default_factory=dict)
    aggregate: bool = False


def make_plan(cfg: Any, runs: list[Run], query_slurm: bool) -> Plan:
    states = ledger.run_states(cfg, runs, query_slurm=query_slurm)
    plan = Plan(states)
    for st in states:
        rid, lines = st.run.run_id, []
        last = st.tasks.get(("train", ""))
        ended = f"; last train job {last.job_id} ended {last.state}" if last else ""
        will_train = False
        if st.trained:
            lines.append("train: skip (checkpoints/final.pt exists)")
        elif (task := st.active("train")) is not None:
            lines.append(f"train: wait (job {task.job_id} is {task.state})")
        else:
            will_train = True
            plan.train.append(st.run)
            if st.resume_step is not None:
                lines.append(f"train: resume from step {st.resume_step}{ended}")
            else:
                lines.append(f"train: from scratch (no checkpoint){ended}")
        for set_name, done in st.eval_done.items():
            key = (set_name, st.roles[set_name])
            if set_name in st.stale and not st.active("eval", set_name):
                n = len(st.stale[set_name])
                lines.append(
                    f"eval {set_name}: {n} shard(s) made with other eval settings, "
                    "moved to eval-stale/ before evaluating again"
                )
            if done:
                lines.append(f"eval {set_name}: skip (shards complete)")
            elif (task := st.active("eval", set_name)) is not None:
                lines.append(f"eval {set_name}: wait (job {task.job_id} is {task.state})")
            elif will_train:
                plan.eval_after_train.setdefault(key, []).append(st.run)
                lines.append(f"eval {set_name}: after its training task")
            elif st.trained:
                plan.eval_now.setdefault(key, []).append(st.run)
                prev = st.tasks.get(("eval", set_name))
                why = f"; last eval job {prev.job_id} ended {prev.state}" if prev else ""
                lines.append(f"eval {set_name}: now (trained, shards missing{why})")
            else:
                lines.append(f"eval {set_name}: after the running training task; relaunch then")
        plan.actions[rid] = lines
    summary = sweep_dir(cfg) / "summary" / "results.csv"
    work = plan.train or plan.eval_after_train or plan.eval_now
    plan.aggregate = bool(work) or not summary.exists()
    if any(st.active("aggregate") for st in states) and not work:
        plan.aggregate = False
    return plan


def arrays_for(cfg: Any, plan: Plan) -> list[slurm.ArraySpec]:
    """The sbatch calls of a plan: at most 1 + 2 x (sets) + 1, whatever the grid size."""
    specs: list[slurm.ArraySpec] = []
    stage_to = cfg.cluster.scratch if cfg.cluster.stage_data else None
    if plan.train:
        specs.append(slurm.ArraySpec(
            "train", [{"run_id": r.run_id} for r in plan.train],
            [(TrainStage(), r.yaml, stage_to) for r in plan.train],
            slurm.train_params(cfg),
        ))  # fmt: skip

    def stage_name(set_name: str, role: str, groups: dict) -> str:
        both = sum(1 for s, _ in groups if s == set_name) > 1
        return f"eval:{set_name}:{role}" if both else f"eval:{set_name}"

    for (set_name, role), runs in plan.eval_after_train.items():
        # aftercorr pairs eval task i with train task i, so this array lists exactly the
        # train array's runs, in its order; a run without this set gets a no-op task.
        wanted = {r.run_id for r in runs}
        calls = [
            (EvalStage(), r.yaml, set_name, role, r.run_id) if r.run_id in wanted else (NoOp(),)
            for r in plan.train
        ]
        tasks = [
            {"run_id": r.run_id, "set": set_name} if r.run_id in wanted else {"noop": True}
            for r in plan.train
        ]
        specs.append(slurm.ArraySpec(
            stage_name(set_name, role, plan.eval_after_train), tasks, calls,
            slurm.eval_params(cfg, set_name), depends_on="train", dependency_kind="aftercorr",
        ))  # fmt: skip
    for (set_name, role), runs in plan.eval_now.items():
        specs.append(slurm.ArraySpec(
            stage_name(set_name, role, plan.eval_now),
            [{"run_id": r.run_id, "set": set_name} for r in runs],
            [(EvalStage(), r.yaml, set_name, role, r.run_id) for r in runs],
            slurm.eval_params(cfg, set_name),
        ))  # fmt: skip
    if plan.aggregate:
        waits = any(s.stage != "aggregate" for s in specs)
        specs.append(slurm.ArraySpec(
            "aggregate", [{}], [(AggregateStage(), str(sweep_dir(cfg)), cfg.allow_partial)],
            slurm.aggregate_params(cfg),
            depends_on="*" if waits else None, dependency_kind="afterany" if waits else None,
        ))  # fmt: skip
    return specs


def print_plan(cfg: Any, plan: Plan) -> None:
    print(f"sweep {cfg.sweep.name}: {len(plan.states)} runs in {sweep_dir(cfg)}")
    for st in plan.states:
        print(f"  {st.run.run_id}  {_settings(st.run)}")
        for line in plan.actions[st.run.run_id]:
            print(f"      {line}")


def _settings(run: Run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.overrides.items()) or "(base config)"


def _slurm_folder(cfg: Any) -> Path:
    return (sweep_dir(cfg) / "slurm").resolve()


def print_arrays(cfg: Any, specs: list[slurm.ArraySpec], scripts: bool) -> None:
    if not specs:
        print("nothing to submit: every run is complete or in flight")
        return
    print(f"{len(specs)} sbatch call(s):")
    for spec in specs:
        dep = f", {spec.dependency_kind} on {spec.depends_on}" if spec.depends_on else ""
        print(f"  {spec.stage}: {len(spec.tasks)} task(s){dep}")
        if scripts:
            params = dict(spec.params)
            if spec.depends_on:
                # The job ids exist only once submitted: shown as <stage>.
                target = "<train>" if spec.depends_on == "train" else "<every array above>"
                kind = spec.dependency_kind
                if kind == "aftercorr" and len(spec.tasks) == 1:
                    kind = "afterok"
                params["dependency"] = f"{kind}:{target}"
                params["additional_parameters"] = {
                    **params["additional_parameters"],
                    "kill-on-invalid-dep": "yes",
                }
            text = slurm.render_script(cfg, _slurm_folder(cfg), params, len(spec.tasks))
            print("    " + text.replace("\n", "\n    "))


def submit(cfg: Any, specs: list[slurm.ArraySpec], plan: Plan) -> dict[str, str]:
    """Submit the arrays in order, wiring dependencies; record each in the ledger.

    The aggregate job also waits for tasks of earlier launches that are still in flight.
    """
    ids: dict[str, str] = {}
    in_flight = sorted({
        task.job_id.split("_")[0]
        for st in plan.states for task in st.tasks.values()
        if task.state in slurm.ACTIVE_STATES
    })  # fmt: skip
    for spec in specs:
        dependency = None
        if spec.depends_on == "train" and "train" in ids:
            single = len(spec.tasks) == 1
            dependency = slurm.dependency_string("aftercorr", [ids["train"]], single)
        elif spec.depends_on == "*" or (spec.stage == "aggregate" and in_flight):
            waits = list(dict.fromkeys([*ids.values(), *in_flight]))
            dependency = slurm.dependency_string("afterany", waits, False)
        job_id = slurm.submit_array(cfg, _slurm_folder(cfg), spec, dependency)
        ids[spec.stage] = job_id
        ledger.record_submission(cfg, spec.stage, job_id, spec.tasks, dependency)
        print(f"submitted {spec.stage}: job {job_id} ({len(spec.tasks)} task(s))")
    return ids


def run_local(cfg: Any, plan: Plan) -> int:
    """The same stages, one after another, in this process (GPU if there is one, else CPU)."""
    failed: dict[str, str] = {}
    for run in plan.train:
        try:
            TrainStage()(run.yaml)
        except Exception as err:  # one failed run must not stop the others
            failed[run.run_id] = f"{type(err).__name__}: {err}"
            print(f"train {run.run_id} failed: {failed[run.run_id]}", file=sys.stderr)
            traceback.print_exc()
    for groups in (plan.eval_after_train, plan.eval_now):
        for (set_name, role), runs in groups.items():
            for run in runs:
                if run.run_id in failed:
                    continue
                EvalStage()(run.yaml, set_name, role, run.run_id)
    if plan.aggregate:
        from dhm.aggregate import IncompleteSweepError

        try:
            summary = AggregateStage()(str(sweep_dir(cfg)), cfg.allow_partial)
            print(f"summary: {summary}")
        except IncompleteSweepError as err:
            print(f"aggregate: {err}", file=sys.stderr)
            return 1
    return 1 if failed else 0


def status(cfg: Any, runs: list[Run]) -> int:
    query = cfg.cluster.name == "slurm"
    states = ledger.run_states(cfg, runs, query_slurm=query)
    header = ("run_id", "stage", "slurm", "epoch/step", "loss", "log")
    rows = []
    counts: dict[str, int] = {}
    for st in states:
        done = sum(st.eval_done.values())
        last_train = st.tasks.get(("train", ""))
        if st.trained and done == len(st.eval_done):
            stage = "done"
        elif st.trained:
            stage = f"eval {done}/{len(st.eval_done)}"
        elif st.active("train"):
            stage = "training"
        elif last_train is not None and last_train.state in FAILED_STATES:
            stage = "failed"
        else:
            stage = "train pending"
        counts[stage.split()[0]] = counts.get(stage.split()[0], 0) + 1
        task = st.active("train") or st.active("eval", None) or st.newest_task()
        reached, loss = ledger.progress(st.run.run_dir)
        rows.append((st.run.run_id, stage, task.state if task else "-", reached, loss,
                     task.log if task else str(st.run.run_dir / "logs")))  # fmt: skip
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    summary = sweep_dir(cfg) / "summary" / "results.csv"
    parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"{len(states)} runs: {parts}; summary {'exists' if summary.exists() else 'missing'}")
    return 0


def cancel(cfg: Any) -> int:
    """scancel every job of the sweep's ledger that is still pending or running."""
    subs = ledger.submissions(cfg)
    states = slurm.job_states([s["job_id"] for s in subs])
    ids = sorted({
        job if task is None else f"{job}_{task}"
        for (job, task), state in states.items()
        if state in slurm.ACTIVE_STATES
    })  # fmt: skip
    slurm.cancel(ids)
    print(f"cancelled {len(ids)} task(s)" + (f": {' '.join(ids)}" if ids else ""))
    return 0


def main(cfg: DictConfig) -> int:
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not allowed: one of {', '.join(MODES)}")
    on_slurm = cfg.cluster.name == "slurm"
    slurm.check_cluster(cfg, query_slurm=on_slurm and cfg.mode in ("run", "dry_run"))
    runs = expand(cfg)
    for run in runs:
        slurm.check_batch_split(cfg.cluster, run.cfg.train.batch_size, f"run {run.run_id}: ")
    if cfg.mode == "status":
        return status(cfg, runs)
    if cfg.mode == "cancel":
        return cancel(cfg)
    if cfg.mode == "aggregate":
        write_plan(cfg, runs)
        return run_local(cfg, Plan(states=[], aggregate=True))
    plan = make_plan(cfg, runs, query_slurm=on_slurm)
    print_plan(cfg, plan)
    if cfg.mode == "run":
        for st in plan.states:
            for set_name, paths in st.stale.items():
                if not st.active("eval", set_name):
                    move_aside = ledger.move_aside(st.run.run_dir, paths)
                    print(f"moved {len(paths)} stale shard(s) of {st.run.run_id} to {move_aside}")
    if on_slurm:
        specs = arrays_for(cfg, plan)
        print_arrays(cfg, specs, scripts=cfg.mode == "dry_run")
        if cfg.mode == "dry_run" or not specs:
            return 0
        write_plan(cfg, runs)
        ids = submit(cfg, specs, plan)
        overrides = " ".join(a for a in sys.argv[1:] if not a.startswith("mode="))
        print(f"job ids: {' '.join(ids.values())}")
        print(f"follow: python launch.py {overrides} mode=status".replace("  ", " "))
        return 0
    if cfg.mode == "dry_run":
        return 0
    write_plan(cfg, runs)
    return run_local(cfg, plan)


def hydra_error_message(err: BaseException) -> str:
    """One line from a Hydra/OmegaConf error and its cause (which names the key and type)."""
    parts = []
    while err is not None and len(parts) < 3:
        for line in str(err).strip().splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if line and not line.startswith(("full_key", "object_type", "provider=")):
                parts.append(line)
        err = err.__cause__
    return " ".join(dict.fromkeys(parts))


def cli(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(OmegaConf.to_yaml(compose_config([a for a in argv if a not in ("-h", "--help")])))
        return 0
    try:
        cfg = compose_config(argv)
        return main(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {hydra_error_message(err)}", file=sys.stderr)
        return USAGE_ERROR
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except slurm.SlurmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
