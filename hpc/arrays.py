"""Submitting a plan: the sbatch calls (arrays) it needs, each task one stage call.

Runs that need the same resources (memory, excluded nodes) share arrays; an array holds at most
MaxArraySize tasks (a bigger stage is split into chunks, each eval chunk aftercorr on its own
train chunk); a task holds ``cluster.runs_per_task`` runs. The number of sbatch calls stays
constant per resource class and chunk, whatever the grid size. ``hpc.slurm`` renders and
submits them.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from hpc.plan import EvalWork, Plan
from hpc.schema import parse_time_minutes, runs_per_task
from hpc.slurm import ArraySpec, Resources, Yamls, stage_params, stage_resources
from hpc.stages import AggregateStage, EvalStage, NoOp, TrainStage
from hpc.sweep import Run, sweep_dir


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or []


def _res_key(r: Resources) -> tuple:
    return (r.mem, r.exclude)


def _label(r: Resources, base: Resources, chunk: int, chunks: int) -> str:
    parts = []
    if r.mem != base.mem:
        parts.append(f"mem={r.mem}")
    if r.exclude != base.exclude:
        parts.append(f"exclude={r.exclude}")
    if chunks > 1:
        parts.append(f"chunk {chunk + 1}/{chunks}")
    return ", ".join(parts)


def _limits(cfg: Any) -> dict[str, Any]:
    c = cfg.cluster
    return {
        "time_min": parse_time_minutes(c.time, "cluster.time"),
        "signal_delay_s": c.signal_delay_s,
        "max_requeues": c.max_requeues,
        "gpu_bind": c.gpu_bind,
    }


def _eval_name(work: EvalWork, groups: Any) -> str:
    """An eval array's name: ``eval:<set>``, with its role when the set has two roles."""
    both = len({w.role for w in groups if w.set_name == work.set_name}) > 1
    return f"eval:{work.set_name}:{work.role}" if both else f"eval:{work.set_name}"


def _eval_call(work: EvalWork, runs: list[Run]) -> tuple:
    return (EvalStage(), Yamls(runs), work.set_name, work.role, None, work.checkpoint, work.parts)


def _by_resources(members: list[tuple[Run, Resources]],
                  code: Any = None) -> list[list[tuple[Run, Resources]]]:  # fmt: skip
    """Runs grouped by resources (and by ``code(run)``, the snapshot a train task runs)."""
    groups: dict[tuple, list[tuple[Run, Resources]]] = {}
    for run, r in members:
        groups.setdefault((_res_key(r), code(run) if code else None), []).append((run, r))
    return list(groups.values())


def _evals_after(cfg: Any, plan: Plan, part: list[list[Run]], train_index: int,
                 label: str) -> list[ArraySpec]:  # fmt: skip
    """The eval arrays that wait on one train array (aftercorr pairs eval task i with train
    task i: each lists exactly the train array's tasks, in its order; a task without this set
    gets a no-op)."""
    base = stage_resources(cfg, "eval")
    specs = []
    for work, evals in plan.eval_after_train.items():
        wanted = {x.run_id for x in evals}
        tasks, calls = [], []
        for runs in part:
            mine = [x for x in runs if x.run_id in wanted]
            tasks.append(_task(mine, work.label) if mine else {"noop": True})
            calls.append(_eval_call(work, mine) if mine else (NoOp(),))
        specs.append(
            ArraySpec(
                _eval_name(work, plan.eval_after_train),
                tasks,
                calls,
                stage_params(cfg, "eval", base, f"eval-{work.set_name}"),
                depends_on=train_index,
                dependency_kind="aftercorr",
                group=label,
                code=plan.code,
            )
        )
    return specs


def _train_arrays(cfg: Any, plan: Plan, per_task: int, chunk: int) -> list[ArraySpec]:
    """Train arrays by resource class and chunk, each followed by its eval arrays."""
    stage_to = cfg.cluster.scratch if cfg.cluster.stage_data else None
    base = stage_resources(cfg, "train")
    limits = _limits(cfg)  # each train task gets its own copy (submitit pickles each call)
    specs: list[ArraySpec] = []
    for members in _by_resources(plan.train, plan.code_of):
        r, code = members[0][1], plan.code_of(members[0][0])
        parts = _chunks(_chunks([run for run, _ in members], per_task), chunk)
        for k, part in enumerate(parts):
            label = _label(r, base, k, len(parts))
            if code != plan.code and code is not None:  # resumes under its launch's code
                label = ", ".join(filter(None, [label, f"code {code.name}"]))
            train_index = len(specs)
            calls = [
                (TrainStage(), Yamls(runs, plan.resume_yaml), stage_to, dict(limits))
                for runs in part
            ]
            params = stage_params(cfg, "train", r, "train")
            specs.append(ArraySpec("train", [_task(runs) for runs in part], calls, params,
                                   group=label, code=code))  # fmt: skip
            specs += _evals_after(cfg, plan, part, train_index, label)
    return specs


def _eval_now_arrays(cfg: Any, plan: Plan, per_task: int, chunk: int) -> list[ArraySpec]:
    """Eval arrays of trained runs (no dependency), by set, resource class and chunk."""
    base = stage_resources(cfg, "eval")
    specs = []
    for work, members in plan.eval_now.items():
        for sub in _by_resources(members):
            r = sub[0][1]
            parts = _chunks(_chunks([run for run, _ in sub], per_task), chunk)
            for k, part in enumerate(parts):
                specs.append(
                    ArraySpec(
                        _eval_name(work, plan.eval_now),
                        [_task(runs, work.label) for runs in part],
                        [_eval_call(work, runs) for runs in part],
                        stage_params(cfg, "eval", r, f"eval-{work.set_name}"),
                        group=_label(r, base, k, len(parts)),
                        code=plan.code,
                    )
                )
    return specs


def _aggregate_array(cfg: Any, plan: Plan, waits: bool) -> ArraySpec:
    """The aggregate job, afterany on every array above (if any)."""
    launch = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    call = (AggregateStage(), str(sweep_dir(cfg)), cfg.allow_partial, cfg.replace_summary, launch)
    return ArraySpec(
        "aggregate",
        [{}],
        [call],
        stage_params(cfg, "aggregate", stage_resources(cfg, "aggregate"), "aggregate"),
        dependency_kind="afterany" if waits else None,
        code=plan.code,
    )


def arrays_for(cfg: Any, plan: Plan, max_array_size: int = 1001) -> list[ArraySpec]:
    """The sbatch calls of a plan (see the module docstring)."""
    per_task = runs_per_task(cfg.cluster)
    per_task = 1 if per_task == "auto" else per_task
    chunk = max(1, int(cfg.cluster.max_array_size or max_array_size))
    specs = _train_arrays(cfg, plan, per_task, chunk)
    specs += _eval_now_arrays(cfg, plan, per_task, chunk)
    if plan.aggregate:
        specs.append(_aggregate_array(cfg, plan, waits=bool(specs)))
    return specs


def _task(runs: list[Run], set_name: str | None = None) -> dict[str, Any]:
    task: dict[str, Any] = {"runs": [r.run_id for r in runs]}
    if set_name is not None:
        task["set"] = set_name
    return task
