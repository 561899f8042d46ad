"""main(cfg): validate -> plan -> submit (run, dry_run), aggregate, calibrate. Status, cancel
and report of a stored sweep are ``hpc.stored``'s.

    python launch.py sweep=alpha_beta cluster=slurm      # submit the study, return at once
    python launch.py sweep=alpha_beta mode=dry_run       # the plan, its cost, the sbatch scripts
    python launch.py sweep.name=alpha_beta mode=aggregate
    python launch.py                                     # the offline demo, in this process

Everything a compute node would refuse is refused here first, in ``mode=run`` and
``mode=dry_run`` alike: values and keys (hpc.schema), a plan whose runs differ from the stored
one, the warm-start checkpoint (loaded and matched), the dataset files (found, each one's
header and length checked),
resources the partition's nodes do not have, the array size limits and ``sbatch --test-only``.
Usage errors exit 2, runtime errors 1, each with one line (``hpc.cli``); nothing is written or
submitted before the checks pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dhm.core import variants as V
from dhm.core.config import ConfigError
from dhm.core.datasets import DataError, check_files
from dhm.core.layout import IncompleteSweepError, eval_sets
from hpc import costs, disk, evaluate, ledger, lock, slurm, snapshot, stages
from hpc.arrays import arrays_for
from hpc.plan import Plan, make_plan
from hpc.schema import check_batch_split, check_launch, on_slurm
from hpc.state import run_reports
from hpc.sweep import (
    Run,
    check_plan_unchanged,
    expand,
    plan_path,
    select,
    stored_sweep,
    sweep_dir,
    write_plan,
)

FULL_PLAN_RUNS = 40  # above this many runs the plan is printed grouped by action


class DiskError(RuntimeError):
    """Something on disk that a launch cannot use as it is (exit 1); the message names it."""


def dataset_problems(runs: list[Run]) -> list[str]:
    """Every dataset file the runs need that a node could not read, one reason each."""
    seen: set[tuple[str, str, bool]] = set()
    problems = []
    for run in runs:
        d = run.cfg.data
        wanted = [(d.name, True), (d.name, False)]
        wanted += [(name, False) for name, role in eval_sets(run.cfg) if role == "ood"]
        for name, train in wanted:
            if (name, d.root, train) not in seen and name in ("cifar10", "cifar100", "svhn"):
                seen.add((name, d.root, train))
                if not (d.download and not Path(d.root).exists()):
                    try:
                        check_files(name, d.root, train)
                    except DataError as err:
                        problems.append(str(err))
    return problems


def preflight(cfg: Any, runs: list[Run], info: slurm.ClusterInfo | None) -> list[str]:
    """What a compute node would refuse, refused here: dataset files (every reason at once;
    a dry run shows its plan first: they are returned), warm starts, resources, an unwritable
    root."""
    problems = dataset_problems(runs)
    if problems and cfg.mode != "dry_run":
        raise DataError("\n  ".join(problems))
    warm = {run.cfg.model.warm_start: run for run in runs if run.cfg.model.warm_start}
    for path, run in warm.items():
        stages.check_warm_start(run.cfg, path)  # loads it (torch), and checks that it fits
    check_root(cfg)
    if info is not None:
        resources = {s: slurm.stage_resources(cfg, s) for s in ("train", "eval", "aggregate")}
        slurm.check_resources(cfg, info, resources)
    return problems


def check_root(cfg: Any) -> None:
    """ConfigError when this user cannot write under root (before the lock creates a folder)."""
    root = Path(cfg.root).expanduser().resolve()
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"root={cfg.root}: {probe} is not writable by this user")


def _check_resume_points(plan: Plan) -> None:
    train = {run.run_id for run, _ in plan.train}
    for st in plan.states:
        if st.run.run_id in train and st.bad_resume is not None:
            good = f"step {st.resume_step}" if st.resume_step is not None else "scratch"
            raise DiskError(
                f"run {st.run.run_id}: its newest checkpoint {st.bad_resume} is truncated or "
                f"corrupt; move it aside (mv {st.bad_resume} {st.bad_resume}.bad) to resume "
                f"from {good}, or remove {st.run.run_dir} to train it again"
            )


def print_plan(cfg: Any, plan: Plan, n_total: int) -> None:
    print(
        f"sweep {cfg.sweep.name}: {n_total} runs in {sweep_dir(cfg)}"
        + (f", {len(plan.states)} selected" if len(plan.states) != n_total else "")
    )
    if len(plan.states) <= FULL_PLAN_RUNS:
        for st in plan.states:
            print(f"  {st.run.run_id}  {_settings(st.run)}")
            for line in plan.actions[st.run.run_id]:
                print(f"      {line}")
    else:
        counts: dict[str, int] = {}
        for lines in plan.actions.values():
            for line in lines:
                key = line.split(" (job ")[0].split("; job ")[0]
                counts[key] = counts.get(key, 0) + 1
        for line, n in counts.items():
            print(f"  {n:5d} x {line}")
    print(f"  aggregate: {'yes' if plan.aggregate else 'no'} ({plan.aggregate_why})")
    if plan.refused:
        print(f"{len(plan.refused)} run(s) not resubmitted, see above: {' '.join(plan.refused)}")


def _settings(run: Run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.overrides.items()) or "(base config)"


def _slurm_folder(cfg: Any) -> Path:
    return (sweep_dir(cfg) / "slurm").resolve()


def print_arrays(cfg: Any, specs: list[slurm.ArraySpec], scripts: bool) -> None:
    if not specs:
        print("nothing to submit: every run is complete, in flight or needs you (see above)")
        return
    print(f"{len(specs)} sbatch call(s):")
    for spec in specs:
        dep = ""
        if spec.dependency_kind == "aftercorr":
            dep = f", aftercorr on train array #{spec.depends_on + 1}"
        elif spec.dependency_kind:
            dep = ", afterany on every array above"
        packed = max((len(t.get("runs", [])) for t in spec.tasks), default=1)
        pack = f", {packed} runs per task" if packed > 1 else ""
        group = f" [{spec.group}]" if spec.group else ""
        print(f"  {spec.stage}{group}: {len(spec.tasks)} task(s){pack}{dep}")
        if packed > 1 and not spec.params.get("mem"):
            print(
                f"    note: each task holds {packed} processes (Slurm counts ~0.5 GB of RSS "
                "for each torch process) in the partition's default memory; set cluster.mem "
                "(eval: cluster.eval_mem) if that is less"
            )
        if scripts:
            params = dict(spec.params)
            if spec.dependency_kind:
                kind = spec.dependency_kind
                if kind == "aftercorr" and len(spec.tasks) == 1:
                    kind = "afterok"
                params["dependency"] = f"{kind}:<job id>"
                params["additional_parameters"] = {
                    **params["additional_parameters"],
                    "kill-on-invalid-dep": "yes",
                }
            text = slurm.render_script(cfg, _slurm_folder(cfg), params, len(spec.tasks),
                                       spec.code)  # fmt: skip
            print("    " + text.replace("\n", "\n    "))


def run_local(cfg: Any, plan: Plan) -> int:
    """The same stages, one after another, in this process (GPU if there is one, else CPU)."""
    failed: dict[str, str] = {}
    for run, _ in plan.train:
        try:
            stages.TrainStage()(run.yaml)
        except Exception as err:  # one failed run must not stop the others
            failed[run.run_id] = f"training failed: {type(err).__name__}: {err}"
            print(f"train {run.run_id} failed: {type(err).__name__}: {err}", file=sys.stderr)
            if os.environ.get("DHM_TRACEBACK"):
                traceback.print_exc()
    evals = [(k, r) for k, runs in plan.eval_after_train.items() for r in runs]
    evals += [(k, r) for k, runs in plan.eval_now.items() for r, _ in runs]
    for work, run in evals:
        if run.run_id in failed:
            continue
        try:
            stages.EvalStage()(
                run.yaml, work.set_name, work.role, None, work.checkpoint, work.parts
            )
        except Exception as err:
            failed[run.run_id] = f"eval {work.label} failed: {type(err).__name__}: {err}"
            print(f"eval {work.label} of {run.run_id} failed: {err}", file=sys.stderr)
    if plan.aggregate:
        reasons, states = run_reports(cfg, query=False)
        if _aggregate(cfg, {**reasons, **failed}, states) != 0:
            return 1
    return 1 if failed else 0


def _aggregate(cfg: Any, reasons: dict[str, str], states: dict[str, dict],
               runs: list[Run] | None = None, out: Path | None = None) -> int:  # fmt: skip
    """The aggregate stage in this process; 1 when runs are incomplete (unless allowed)."""
    try:
        summary = stages.AggregateStage()(
            str(sweep_dir(cfg)),
            cfg.allow_partial,
            cfg.replace_summary,
            reasons=reasons,
            states=states,
            run_ids=None if runs is None else [r.run_id for r in runs],
            summary_dir=out,
        )
    except IncompleteSweepError as err:
        print(f"aggregate: {err}", file=sys.stderr)
        return 1
    print(f"summary: {summary} (report: {Path(summary) / 'report.html'})")
    return 0


def _submit(cfg: Any, plan: Plan, runs: list[Run], info: slurm.ClusterInfo,
            estimates: dict[str, dict[str, float]], code: snapshot.Code | None,
            save: bool = True) -> int:  # fmt: skip
    specs = arrays_for(cfg, plan, info.max_array_size)
    tasks = sum(len(s.tasks) for s in specs)
    costs.refuse_if_over_limits(cfg, info, tasks)
    slurm.test_only(cfg, _slurm_folder(cfg), specs)
    print_arrays(cfg, specs, scripts=cfg.mode == "dry_run")
    if save:
        plan.facts.save()  # every check passed: what was read inside files is kept
    if specs:
        print(f"sbatch --test-only accepted all {len(specs)} array(s)")
    if cfg.mode == "dry_run":
        return 0
    if not specs:
        if cfg.mode != "evaluate" and (cfg.replan or not plan_path(cfg).exists()):
            write_plan(cfg, runs, estimates)  # a replan that submits nothing still is the plan
        return 0
    if code is not None:  # before the first sbatch call: a snapshot that cannot be written
        path, new = code.write(sweep_dir(cfg))  # fails the launch here (OSError: exit 1)
        print(f"code: {'wrote' if new else 'reusing'} snapshot {path}")
    if cfg.mode != "evaluate":  # the stored runs keep the settings they were trained with
        write_plan(cfg, runs, estimates)
    evaluate.register(sweep_dir(cfg), plan.variant)
    in_flight = sorted(
        {
            a.job_id.split("_")[0]
            for st in plan.states
            for atts in st.attempts.values()
            for a in atts
            if a.active
        }
    )
    ids = slurm.submit_all(cfg, _slurm_folder(cfg), specs, in_flight)
    print(f"job ids: {' '.join(ids)}")
    follow = [
        "python",
        "launch.py",
        f"sweep.name={cfg.sweep.name}",
        f"root={cfg.root}",
        "mode=status",
    ]
    print(f"follow: {shlex.join(follow)}")
    return 0


def _selection_dir(cfg: Any, runs: list[Run]) -> Path:
    digest = hashlib.sha256(" ".join(r.run_id for r in runs).encode()).hexdigest()[:8]
    return sweep_dir(cfg) / f"summary-{digest}"


def aggregate_mode(cfg: DictConfig, argv: list[str]) -> int:
    """mode=aggregate: the aggregate stage in this process, for the stored sweep (or a
    selection of it, into ``summary-<hash>/``)."""
    cfg, all_runs, _ = stored_sweep(cfg, argv)
    runs = select(cfg, all_runs)
    whole = len(runs) == len(all_runs)
    reasons, states = run_reports(cfg, runs, on_slurm(cfg))
    return _aggregate(cfg, reasons, states, None if whole else runs,
                      None if whole else _selection_dir(cfg, runs))  # fmt: skip


def main(cfg: DictConfig, argv: list[str] | None = None) -> int:
    """A launch, its dry run, aggregate or calibrate (status, cancel and report are
    ``hpc.stored.main``'s: hpc.cli chooses). A launch and aggregate hold the sweep's lock."""
    argv = list(argv or [])
    check_launch(cfg)
    if cfg.mode == "calibrate":
        _, selected = _expanded(cfg)
        print(f"calibration: {costs.calibrate(cfg, selected)}")
        return 0
    if cfg.mode == "dry_run":
        return _plan_and_submit(cfg, argv)[0]
    if cfg.mode == "evaluate":  # on the sweep's cluster profile unless cluster= names one
        evaluate.refuse_training_overrides(argv)
        cfg = stored_sweep(cfg, argv)[0]
    check_root(cfg)
    with lock.held(sweep_dir(cfg), f"launch.py mode={cfg.mode}", cfg.lock_wait_s):
        if cfg.mode == "aggregate":
            return aggregate_mode(cfg, argv)
        status, cfg, plan = _plan_and_submit(cfg, argv)
        return status if status is not None else run_local(cfg, plan)


def _expanded(cfg: Any) -> tuple[list[Run], list[Run]]:
    """(every run of the sweep, the selected ones), checked against the cluster profile and
    the stored plan."""
    runs = expand(cfg)
    batch_sizes: dict[int, str] = {}  # each distinct batch size, with its first run
    for run in runs:
        batch_sizes.setdefault(run.cfg.train.batch_size, run.run_id)
    for batch_size, run_id in batch_sizes.items():
        check_batch_split(cfg.cluster, batch_size, f"run {run_id}: ")
    check_plan_unchanged(cfg, runs)
    return runs, select(cfg, runs)


def _runs(cfg: Any, argv: list[str]) -> tuple[Any, list[Run], list[Run], V.Variant]:
    """(the config, every run of the sweep, the selected ones, the variant they evaluate): a
    launch expands its grid; mode=evaluate reads the stored runs and gives them the variant."""
    sweep = sweep_dir(cfg)
    if cfg.mode == "evaluate":
        cfg, stored, _ = stored_sweep(cfg, argv)
        variant, _ = evaluate.resolve(cfg, V.read_registry(sweep), argv)
        runs = evaluate.with_variant(stored, variant, cfg.eval.device)
        selected = select(cfg, runs)
    else:
        cfg = cfg.copy()
        variant, _ = evaluate.launch_variant(cfg, sweep, argv)
        runs, selected = _expanded(cfg)
    evaluate.check_checkpoints(selected, variant)
    return cfg, runs, selected, variant


def _plan_and_submit(cfg: Any, argv: list[str]) -> tuple[int | None, Any, Plan]:
    """Plan the launch and submit it (Slurm) or store it (local); (exit status, or None when
    the plan is to run here; the config; the plan)."""
    slurm_stages = on_slurm(cfg)
    asked = slurm.AskedCluster() if slurm_stages else None  # answering while the grid expands
    try:
        cfg, runs, selected, variant = _runs(cfg, argv)
        info = asked.info() if asked is not None else None
    finally:
        if asked is not None:
            asked.close()
    problems = preflight(cfg, selected, info)
    if slurm_stages and cfg.mode != "dry_run":
        _adopt(cfg)
    plan = make_plan(cfg, selected, slurm_stages, runs, train=cfg.mode != "evaluate")
    plan.variant = variant
    default = (V.read_registry(sweep_dir(cfg)) or [variant])[0]
    diff = "the default" if variant.settings == default.settings else variant.describe(default)
    print(f"evaluation: variant {variant.name} ({variant.id}: {diff})")
    _check_resume_points(plan)
    code = snapshot.read() if slurm_stages else None
    if code is not None:
        _assign_code(cfg, plan, code)
    if cfg.cluster.runs_per_task == "auto":
        n, why = costs.auto_runs_per_task(cfg)
        print(why)
        cfg = cfg.copy()
        cfg.cluster.runs_per_task = n
    print_plan(cfg, plan, len(runs))
    estimates: dict[str, dict[str, float]] = {}
    if slurm_stages or cfg.cluster.budget_gpu_hours is not None:
        est = costs.estimate(cfg, plan)
        print("\n".join(costs.describe(est)))
        costs.check_budget(cfg, est)
        estimates = est["per_run"]
    _disk(cfg, plan, runs, code)
    if slurm_stages:
        status = _submit(cfg, plan, runs, info, estimates, code, save=not problems)
    else:
        if not problems:
            plan.facts.save()
        status = 0 if cfg.mode == "dry_run" else None
    if problems:
        raise DataError(
            f"{len(problems)} dataset problem(s); the plan above is what the launch would do "
            "once they are fixed:\n  " + "\n  ".join(problems)
        )
    if status is not None:
        return status, cfg, plan
    if cfg.mode != "evaluate":
        write_plan(cfg, runs)
    evaluate.register(sweep_dir(cfg), variant)
    return None, cfg, plan


UNSETTLED_WAIT_S = 120  # an sbatch call of a killed launch may still be answering this long


def _adopt(cfg: Any) -> None:
    """Record the jobs of earlier launches that died before recording them; refuse while one
    of their sbatch calls may still be answering (its job would be submitted twice)."""
    fresh = [e for e in ledger.adopt(cfg) if ledger.age_s(e) < UNSETTLED_WAIT_S]
    if fresh:
        raise ledger.SlurmError(
            f"a launch of this sweep stopped {ledger.age_s(fresh[-1]):.0f} s ago during its "
            f"sbatch call for the {fresh[-1]['stage']} array, before recording it: that job may "
            f"not be in the queue yet. Run this again in {UNSETTLED_WAIT_S // 60} minutes: the "
            "job is then adopted, or the call is known never to have been made"
        )


def _assign_code(cfg: Any, plan: Plan, code: snapshot.Code) -> None:
    """The snapshot each train task imports: a run that resumes keeps the one it started
    under (checked intact now), unless ``code=latest``; everything else takes this launch's."""
    sweep = sweep_dir(cfg).resolve()  # the job script names it: never relative
    plan.code = code.path(sweep)
    state = {st.run.run_id: st for st in plan.states}
    for run, _ in plan.train:
        st = state[run.run_id]
        own = snapshot.run_code(run.run_dir) if st.resume_step is not None else ""
        if not own or own == code.id:
            continue
        if cfg.code == "latest":
            plan.actions[run.run_id].append(f"code: moves from snapshot {own} to {code.id}")
            continue
        snapshot.check_resumable(sweep, run.run_id, own)
        plan.resume_code[run.run_id] = snapshot.code_dir(sweep, own)
        stored = run.run_dir / "config.yaml"  # written by that code: keys it knows
        if stored.exists():
            plan.resume_yaml[run.run_id] = stored.read_text()
        plan.actions[run.run_id].append(
            f"code: resumes under its snapshot {own} (code=latest runs=[{run.run_id}] moves it)"
        )
    where = plan.code if plan.code.exists() else "new"
    print(f"code: snapshot {code.id} ({code.size / 1024:.0f} KB, {len(code.files)} files; {where})")


def _disk(cfg: Any, plan: Plan, runs: list[Run], code: snapshot.Code | None) -> None:
    """The sweep's disk estimate, printed; refused above cluster.disk_quota_gb. A launch also
    sweeps the ``.tmp`` files killed writers left where no job of the sweep can be writing."""
    est = disk.estimate(runs, sweep_dir(cfg), snapshot_bytes=code.size if code else 0)
    print("\n".join(est.lines()))
    disk.check_quota(est, cfg.cluster.disk_quota_gb)
    if cfg.mode == "dry_run" or not sweep_dir(cfg).exists() or len(plan.states) != len(runs):
        return  # the whole sweep's jobs are known only when every run is planned
    active = [a for a in plan.attempts if a.active]  # the aggregate's and outside runs' too
    busy = {rid for a in active for rid in a.runs}
    swept = disk.sweep_tmp(sweep_dir(cfg), busy, any(a.stage == "aggregate" for a in active))
    if swept:
        print(f"removed {len(swept)} temporary file(s) that killed writers left")


def plan_json(cfg: Any) -> dict[str, Any] | None:
    """The stored plan of a launch config (for tests and tools)."""
    path = plan_path(cfg)
    return json.loads(path.read_text()) if path.exists() else None
