"""Expand a sweep into runs with stable ids; store the plan; select part of it.

A run's id is a short hash of its training identity (``dhm.core.config.training_identity``: the
model, data and train settings that determine its weights, and only those that differ from the
schema's defaults), so the same settings always land in ``<root>/<sweep>/runs/<run_id>/``
whatever the order of the grid, the other runs in it, or fields added to the schema later.

The grid is ``sweep.axes`` (a cartesian product of dotted overrides) plus ``sweep.points``,
crossed with the ``-m`` dimensions (``sweep.multirun``; a point's own settings win) and repeated
for ``sweep.seeds`` seeds. ``plan.json`` stores the runs with their resolved configs, so
``mode=status|cancel|aggregate|report`` work from the sweep's name alone.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from dhm.core.config import (
    RUN_CHECKS,
    RUN_DEFAULTS,
    SCALAR_TYPES,
    ConfigError,
    Plain,
    RunConfig,
    check_run,
    copy_data,
    learns_sigma,
    to_yaml,
    training_identity,
)
from dhm.core.fsutil import atomic_write_text
from hpc.schema import ClusterConfig

RUN_SECTIONS = ("model", "data", "train")
PLAN_VERSION = 2
SEED_KEY = "train.seed"


@dataclass
class Run:
    run_id: str
    overrides: dict[str, Any]  # the swept settings of this run (dotted keys)
    cfg: Plain  # a full, validated RunConfig with run_dir set, as plain data

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @functools.cached_property
    def yaml(self) -> str:
        """The resolved config as YAML: what every stage of this run receives."""
        return to_yaml(self.cfg)


def sweep_dir(cfg: Any) -> Path:
    return Path(cfg.root).expanduser() / cfg.sweep.name


def run_id_of(run_cfg: Any) -> str:
    """10 hex chars of sha256 over the canonical JSON of the training identity."""
    text = json.dumps(training_identity(run_cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _in_schema(key: str) -> bool:
    """Whether a dotted key names a field of RunConfig (or an element of a list field)."""
    node: Any = RUN_DEFAULTS
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _check_key(key: str, where: str) -> None:
    section = key.split(".", 1)[0]
    if section == "eval":
        raise ConfigError(
            f"{where} key {key!r} is not allowed: a run is identified by its training config; "
            "put several values in the eval settings instead (e.g. eval.iwae_k=[1,10,100])"
        )
    if section not in RUN_SECTIONS or not _in_schema(key):
        raise ConfigError(
            f"{where} key {key!r} is not allowed: use a dotted key of "
            f"{', '.join(s + '.*' for s in RUN_SECTIONS)} that exists in the schema, "
            "e.g. model.beta, model.vae_split_layer, train.seed"
        )


def _container(node: Any) -> Any:
    return (
        OmegaConf.to_container(node, resolve=True)
        if isinstance(node, DictConfig | ListConfig)
        else node
    )


def grid_points(sweep: Any, base_seed: int = 0) -> list[dict[str, Any]]:
    """The sweep's points as dotted-key dicts, in grid order (see the module docstring)."""
    axes = _container(sweep.axes) or {}
    points = _container(sweep.points) or []
    dims = _container(sweep.get("multirun")) or []
    for key, values in axes.items():
        _check_key(key, "sweep.axes")
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"sweep.axes.{key} must be a non-empty list of values, got {values!r}"
            )
    for i, point in enumerate(points):
        if not isinstance(point, dict):
            raise ConfigError(f"sweep.points[{i}] must be a mapping of dotted keys, got {point!r}")
        for key in point:
            _check_key(key, f"sweep.points[{i}]")
    for dim in dims:
        for point in dim:
            for key in point:
                _check_key(key, "-m")
    # A -m key that is also an axis replaces that axis.
    swept = {k for dim in dims if all(len(p) == 1 for p in dim) for p in dim for k in p}
    kept = {k: v for k, v in axes.items() if k not in swept}
    grid = [dict(zip(kept, combo, strict=True)) for combo in itertools.product(*kept.values())]
    base = (grid if axes else []) + points
    if dims and not base:
        base = [{}]
    out = []
    for combo in itertools.product(*dims):
        crossed = dict(itertools.chain.from_iterable(p.items() for p in combo))
        out += [{**crossed, **point} for point in base]
    seeds = sweep.get("seeds")
    if seeds:
        out = [
            {**p, SEED_KEY: int(p.get(SEED_KEY, base_seed)) + i}
            for p in out
            for i in range(int(seeds))
        ]
    unique: dict[str, dict[str, Any]] = {}
    for point in out:  # the same point from two dimensions: once (keyed, not a list scan)
        unique.setdefault(json.dumps(point, sort_keys=True, default=repr), point)
    return list(unique.values())


def expand(cfg: Any) -> list[Run]:
    """Runs of a launch config, validated, in grid order, without duplicates.

    Raises ConfigError (naming the key) for unknown axis keys, empty axes, an empty grid or a
    run whose values are not allowed.
    """
    base = OmegaConf.structured(RunConfig)
    for section in ("model", "data", "train", "eval"):
        base[section] = cfg[section]
    points = grid_points(cfg.sweep, int(cfg.train.seed))
    if not points:
        raise ConfigError(
            f"sweep {cfg.sweep.name!r} has an empty grid: give sweep.axes or sweep.points"
        )
    base_plain = OmegaConf.to_container(base, resolve=False)
    # Interpolations (``${...}``, e.g. ``data.root=${run_dir}/data``) may refer to swept keys or
    # to run_dir: such configs go through OmegaConf per run and resolve once run_dir is set.
    base_interpolates = _has_interpolation(base_plain)
    coerce = _Coercer(base)
    runs_dir = str(sweep_dir(cfg) / "runs")
    judged: set[tuple] = set()  # (check, the point's values in the sections it reads)
    runs: dict[str, Run] = {}
    for point in points:
        slow = base_interpolates or any(_has_interpolation(v) for v in point.values())
        if slow:
            run_cfg: Any = _updated(base, point)
        else:
            run_cfg = Plain.of(base_plain)  # a fresh copy: Plain.of copies dicts and lists
            for key, value in point.items():
                *parents, leaf = key.split(".")
                node = run_cfg
                for part in parents:
                    node = node[part]
                node[leaf] = coerce(key, value, point)
        run_cfg["run_dir"] = "unset"
        if not learns_sigma(run_cfg["model"]):  # its rate trains nothing: one run, not one a rate
            run_cfg["train"]["sigma_lr"] = RUN_DEFAULTS["train"]["sigma_lr"]
        try:
            if slow:  # an interpolation may reach across sections: every check, every run
                check_run(run_cfg)
            else:
                _check_parts(run_cfg, point, judged)
            rid = run_id_of(run_cfg)
            run_cfg["run_dir"] = os.path.join(runs_dir, rid)
            if slow:
                run_cfg = Plain.of(OmegaConf.to_container(run_cfg, resolve=True))
        except Exception as err:  # a ConfigError, or an interpolation that does not resolve
            raise ConfigError(f"sweep {cfg.sweep.name!r}, point {point}: {err}") from None
        if rid in runs and runs[rid].cfg != run_cfg:
            raise ConfigError(
                f"sweep {cfg.sweep.name!r}: points {runs[rid].overrides} and {point} train the "
                f"same model (run {rid}); they differ only in keys that do not change the weights "
                "(paths, logging, checkpoint cadence, compile, OOD sets), so sweep those by "
                "separate launches instead"
            )
        runs.setdefault(rid, Run(rid, point, run_cfg))
    return list(runs.values())


def _value_key(value: Any) -> tuple:
    """A hashable stand-in for a swept value (1 and 1.0 and True stay apart)."""
    if type(value) in SCALAR_TYPES:
        return (type(value).__name__, value)
    return ("json", json.dumps(value, sort_keys=True, default=repr))


def _check_parts(run_cfg: Any, point: dict[str, Any], judged: set[tuple]) -> None:
    """check_run, each part once per distinct setting of the sections it reads (the other
    sections are the base config's, the same for every point): a 1,000-point grid of seeds x
    betas is judged 10 + 100 times, not 4 x 1,000."""
    for i, (check, sections) in enumerate(RUN_CHECKS):
        mine = tuple((k, _value_key(v)) for k, v in point.items() if k.split(".", 1)[0] in sections)
        if (i, mine) not in judged:
            check(run_cfg)
            judged.add((i, mine))


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, (list, tuple)):
        return any(_has_interpolation(v) for v in value)
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    return False


class _Coercer:
    """A swept value as the schema stores it (``1`` for a float key is ``1.0``), or ConfigError.

    Each distinct (key, value) is validated once, by OmegaConf on a probe copy of the base
    config; a value's validity does not depend on the other keys (check_run judges the
    combinations), so a 1,000-run grid of 30 distinct values costs 30 validations, not 1,000.
    """

    def __init__(self, base: DictConfig) -> None:
        self.probe = base.copy()
        self.cache: dict[tuple[str, tuple], Any] = {}

    def __call__(self, key: str, value: Any, point: dict[str, Any]) -> Any:
        cache_key = (key, _value_key(value))
        if cache_key not in self.cache:
            try:
                OmegaConf.update(self.probe, key, value, merge=False)
                got = OmegaConf.select(self.probe, key, throw_on_missing=True)
                if isinstance(got, DictConfig | ListConfig):
                    got = OmegaConf.to_container(got, resolve=True)
            except Exception as err:  # a value of the wrong type for its key
                raise ConfigError(f"sweep point {point}: {err}") from None
            self.cache[cache_key] = got
        return copy_data(self.cache[cache_key])


def _updated(base: DictConfig, point: dict[str, Any]) -> DictConfig:
    """The base config with a point's values, each validated by OmegaConf (not resolved)."""
    run_cfg = base.copy()
    try:
        for key, value in point.items():
            OmegaConf.update(run_cfg, key, value, merge=False)
    except Exception as err:  # a value of the wrong type for its key
        raise ConfigError(f"sweep point {point}: {err}") from None
    return run_cfg


def swept_keys(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(k for run in runs for k in run.overrides))


# ---------------------------------------------------------------------------- the stored plan


def plan_path(cfg: Any) -> Path:
    return sweep_dir(cfg) / "plan.json"


def read_plan(path: Path) -> dict[str, Any] | None:
    """The stored plan (None: there is none); ConfigError naming the file if it is unreadable."""
    if not path.exists():
        return None
    try:
        plan = json.loads(path.read_text())
        [str(r["run_id"]) for r in plan["runs"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path} is not a readable plan ({type(err).__name__}: {err}); move "
            "it aside to plan a new sweep there"
        ) from None
    return plan


def stored_runs(plan: dict[str, Any], path: Path) -> list[Run]:
    """The runs of a stored plan, as they were expanded (version 2 plans hold the configs)."""
    if plan.get("version", 1) < PLAN_VERSION:
        raise ConfigError(
            f"{path} was written by an older version (no run configs in it): launch the sweep "
            "once with its overrides (mode=dry_run is enough) to rewrite it"
        )
    return [_stored_run(r, path.parent) for r in plan["runs"]]


def _stored_run(r: dict[str, Any], sweep: Path) -> Run:
    """A stored run, living under the sweep folder the plan is in (a sweep moved or copied to
    another root acts on its own runs, never on those it was copied from)."""
    rid = str(r["run_id"])
    config = {**r["config"], "run_dir": str(sweep / "runs" / rid)}
    return Run(rid, dict(r["overrides"]), Plain.of(config))


def outside_runs(plan: dict[str, Any], path: Path) -> list[Run]:
    """The runs earlier plans of the sweep had and a replan dropped (status lists them; a
    cancel can name them)."""
    return [_stored_run(r, path.parent) for r in plan.get("outside", [])]


def check_plan_unchanged(cfg: Any, runs: list[Run]) -> dict[str, Any] | None:
    """The stored plan, after checking that ``runs`` are its runs (ConfigError if not, unless
    ``replan``): a plan whose run ids differ is never overwritten silently."""
    path = plan_path(cfg)
    plan = read_plan(path)
    if plan is None:
        return None
    old = [str(r["run_id"]) for r in plan["runs"]]
    new = [r.run_id for r in runs]
    if old == new or cfg.replan:
        return plan
    added, gone = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    raise ConfigError(
        f"{path} plans other runs ({len(added)} new: {' '.join(added[:4]) or '-'}; "
        f"{len(gone)} not in this launch: {' '.join(gone[:4]) or '-'}). To start a new sweep, "
        "give it another name (sweep.name=...); to change this one, pass replan=true (the old "
        "plan is kept as plan-<time>.json); mode=status, cancel, aggregate and report need no "
        "overrides: they read the stored plan"
    )


def write_plan(
    cfg: Any, runs: list[Run], estimates: dict[str, dict[str, float]] | None = None
) -> Path:
    """``<sweep_dir>/plan.json``: the runs, their swept settings and resolved configs, the
    launch settings status and cancel need (cluster profile, root), and per run the device-hours
    its work was estimated to cost: ``estimated`` {piece: hours} (train, eval:<set>), each
    piece's first estimate only, so a relaunch that plans a piece again (it was never
    submitted, or it resumes) does not count it twice; ``estimated_hours`` their sum."""
    path = plan_path(cfg)
    old = read_plan(path)
    if old is not None and [str(r["run_id"]) for r in old["runs"]] != [r.run_id for r in runs]:
        path.rename(path.with_name(f"plan-{time.strftime('%Y%m%dT%H%M%S')}.json"))
    launch = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    known: dict[str, dict[str, float]] = {}
    if old is not None:  # a plan from before pieces holds one sum: kept as a piece of its own
        for r in old["runs"]:
            pieces = r.get("estimated")
            if not isinstance(pieces, dict):
                pieces = {"earlier": float(r.get("estimated_hours") or 0.0)}
            known[str(r["run_id"])] = {k: float(v) for k, v in pieces.items() if v}
    for run_id, pieces in (estimates or {}).items():
        for piece, hours in pieces.items():
            known.setdefault(run_id, {}).setdefault(piece, round(hours, 4))
    ids = {r.run_id for r in runs}
    outside: dict[str, dict[str, Any]] = {}  # runs a replan dropped: kept visible, untouched
    for r in [*(old or {}).get("outside", []), *(old or {}).get("runs", [])]:
        if str(r["run_id"]) not in ids and "config" in r:  # (version 1 plans hold none)
            outside[str(r["run_id"])] = {k: r[k] for k in ("run_id", "overrides", "config")}
    plan = {
        "version": PLAN_VERSION,
        "sweep": cfg.sweep.name,
        "root": str(Path(cfg.root).expanduser().resolve()),
        "created": old.get("created") if old else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "swept_keys": swept_keys(runs),
        "cluster": launch["cluster"],
        "runs": [
            {
                "run_id": r.run_id,
                "overrides": r.overrides,
                "config": r.cfg.plain(),
                "estimated": known.get(r.run_id, {}),
                "estimated_hours": round(sum(known.get(r.run_id, {}).values()), 4),
            }
            for r in runs
        ],
        "outside": list(outside.values()),
    }
    return atomic_write_text(path, json.dumps(plan, indent=1))


# ---------------------------------------------------------------------------- selections


def _lookup(cfg: Any, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def select(cfg: Any, runs: list[Run]) -> list[Run]:
    """The runs named by ``runs=[id or prefix, ...]`` and matching ``where={key: value or
    [values]}`` (all runs when neither is given); ConfigError when a name or filter fits none."""
    wanted = list(cfg.runs or [])
    where = _container(cfg.where) or {}
    out = runs
    if wanted:
        picked = []
        for name in wanted:
            hits = [r for r in runs if r.run_id.startswith(str(name))]
            if len(hits) != 1:
                what = (
                    "no run"
                    if not hits
                    else f"{len(hits)} runs ({' '.join(r.run_id for r in hits[:4])})"
                )
                raise ConfigError(
                    f"runs: {name!r} names {what} of the {len(runs)} in the plan; "
                    "give a run id or a unique prefix of one"
                )
            picked.append(hits[0])
        out = [r for r in out if r in picked]
    for key, allowed in where.items():
        if key.split(".")[0] not in ("model", "data", "train", "eval"):
            raise ConfigError(
                f"where.{key} is not a run setting: use model.*, data.*, train.* or eval.* keys"
            )
        values = allowed if isinstance(allowed, list) else [allowed]
        out = [r for r in out if _lookup(r.cfg, key) in values]
    if not out:
        raise ConfigError(
            f"runs={wanted or 'all'} where={where}: no run of the plan matches "
            f"(it has {len(runs)} runs)"
        )
    return out


def stored_sweep(cfg: DictConfig, argv: list[str]) -> tuple[DictConfig, list[Run], dict[str, Any]]:
    """The sweep as stored in its plan (by name and root): the config with the stored cluster
    profile (and the command line's ``cluster.<key>`` values) unless the command line names
    another profile (``cluster=``), the runs, and the plan as stored."""
    path = plan_path(cfg)
    plan = read_plan(path)
    if plan is None:
        raise ConfigError(
            f"sweep.name={cfg.sweep.name}, root={cfg.root}: {path} does not exist; launch the "
            "sweep first (or give its name and root as it was launched)"
        )
    runs = stored_runs(plan, path)
    if not any(a.lstrip("+~").startswith("cluster=") for a in argv):
        keys = [a.lstrip("+~").split("=", 1)[0] for a in argv]
        given = [k.removeprefix("cluster.") for k in keys if k.startswith("cluster.")]
        mine = {k: cfg.cluster[k] for k in given if k in cfg.cluster}
        cfg = cfg.copy()
        cfg.cluster = OmegaConf.merge(
            OmegaConf.structured(ClusterConfig), plan["cluster"], OmegaConf.create(mine)
        )
    return cfg, runs, plan
