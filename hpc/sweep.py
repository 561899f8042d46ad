"""Expand a sweep into runs with stable ids.

A run's id is a short hash of its training identity (dhm.config.training_identity: the model,
data and train settings that determine its weights), so the same settings always land in
``<root>/<sweep>/runs/<run_id>/`` whatever the order of the grid or the other runs in it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from dhm.config import ConfigError, Plain, RunConfig, check_run, to_yaml, training_identity

RUN_SECTIONS = ("model", "data", "train")


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
    return Path(cfg.root) / cfg.sweep.name


def run_id_of(run_cfg: Any) -> str:
    """10 hex chars of sha256 over the canonical JSON of the training identity."""
    text = json.dumps(training_identity(run_cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _check_key(key: str, where: str) -> None:
    template = OmegaConf.structured(RunConfig)
    section = key.split(".", 1)[0]
    if section == "eval":
        raise ConfigError(
            f"{where} key {key!r} is not allowed: a run is identified by its training config; "
            "put several values in the eval settings instead (e.g. eval.iwae_k=[1,10,100])"
        )
    if (
        section not in RUN_SECTIONS
        or OmegaConf.select(template, key, default="<absent>") == "<absent>"
    ):
        raise ConfigError(
            f"{where} key {key!r} is not allowed: use a dotted key of "
            f"{', '.join(s + '.*' for s in RUN_SECTIONS)} that exists in the schema, "
            "e.g. model.beta, model.vae_split_layer, train.seed"
        )


def grid_points(sweep: Any) -> list[dict[str, Any]]:
    """The cartesian product of the axes, then the explicit points, as dotted-key dicts."""
    axes = OmegaConf.to_container(sweep.axes, resolve=True) if sweep.axes else {}
    points = OmegaConf.to_container(sweep.points, resolve=True) if sweep.points else []
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
    keys = list(axes)
    grid = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes.values())]
    return (grid if keys else []) + points


def expand(cfg: Any) -> list[Run]:
    """Runs of a launch config, validated, in grid order, without duplicates.

    Raises ConfigError (naming the key) for unknown axis keys, empty axes, an empty grid or a
    run whose values are not allowed.
    """
    base = OmegaConf.structured(RunConfig)
    for section in ("model", "data", "train", "eval"):
        base[section] = cfg[section]
    points = grid_points(cfg.sweep)
    if not points:
        raise ConfigError(
            f"sweep {cfg.sweep.name!r} has an empty grid: give sweep.axes or sweep.points"
        )
    base_plain = OmegaConf.to_container(base, resolve=False)
    # Interpolations (``${...}``, e.g. ``data.root=${run_dir}/data``) may refer to swept keys or
    # to run_dir: such configs go through OmegaConf per run and resolve once run_dir is set.
    base_interpolates = _has_interpolation(base_plain)
    coerce = _Coercer(base)
    runs: dict[str, Run] = {}
    for point in points:
        slow = base_interpolates or any(_has_interpolation(v) for v in point.values())
        if slow:
            run_cfg: Any = _updated(base, point)
        else:
            data = copy.deepcopy(base_plain)
            for key, value in point.items():
                *parents, leaf = key.split(".")
                node = data
                for part in parents:
                    node = node[part]
                node[leaf] = coerce(key, value, point)
            run_cfg = Plain.of(data)
        run_cfg["run_dir"] = "unset"
        try:
            check_run(run_cfg)
            rid = run_id_of(run_cfg)
            run_cfg["run_dir"] = str(sweep_dir(cfg) / "runs" / rid)
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
        self.cache: dict[tuple[str, str], Any] = {}

    def __call__(self, key: str, value: Any, point: dict[str, Any]) -> Any:
        cache_key = (key, json.dumps(value, sort_keys=True, default=repr))
        if cache_key not in self.cache:
            try:
                OmegaConf.update(self.probe, key, value, merge=False)
                got = OmegaConf.select(self.probe, key, throw_on_missing=True)
                if isinstance(got, DictConfig | ListConfig):
                    got = OmegaConf.to_container(got, resolve=True)
            except Exception as err:  # a value of the wrong type for its key
                raise ConfigError(f"sweep point {point}: {err}") from None
            self.cache[cache_key] = got
        return copy.deepcopy(self.cache[cache_key])


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


def write_plan(cfg: Any, runs: list[Run]) -> Path:
    """``<sweep_dir>/plan.json``: the runs and their swept settings, read by the aggregation."""
    path = sweep_dir(cfg) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = {
        "sweep": cfg.sweep.name,
        "swept_keys": swept_keys(runs),
        "runs": [{"run_id": r.run_id, "overrides": r.overrides} for r in runs],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    tmp.replace(path)
    return path
