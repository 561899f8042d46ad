"""The on-disk layout of a sweep, and what in it means done, without h5py, numpy or torch.

    <sweep>/plan.json, variants.json, ledger.jsonl, slurm/
    <sweep>/runs/<run_id>/{config.yaml, checkpoints/, logs/,
                           eval/<checkpoint>-<part>-<part id>/<set>__<start>-<stop>.h5}
    <sweep>/summary/{results.csv, cells.csv, results.md, results.h5, plots/, report.html,
                     manifest.json}

The launcher asks this module which sets a run evaluates (``eval_sets``; in which folders:
``dhm.core.variants``), whether a set's shards cover it (``set_complete``: from the file names
and the set's size, known from the dataset; a shard is opened only when the size is not known) and
whether a summary is done (``summary_complete``: its manifest lists files that all exist, and
it is newer than every shard). ``dhm.evaluation.results`` reads and writes the files themselves.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dhm.core.datasets import DATASETS, TEST_SIZES

SCHEMA_VERSION = 2  # 2: val role, iwae_ess, complexity_bits, pgd, images, dequantized pixels
ROLES = ("id", "val", "ood")
MANIFEST = "manifest.json"
# In <run_dir>/logs/: per-step metrics (dhm.training.monitor), and the train attempts hpc.stages
# records.
METRICS_LOG, ATTEMPTS_LOG = "metrics.csv", "train_attempts.jsonl"
_SHARD_RE = re.compile(r"^(?P<set>.+)__(?P<start>\d{7})-(?P<stop>\d{7})\.h5$")


class IncompleteSweepError(RuntimeError):
    """Some runs are missing, corrupt or incompletely evaluated; the message lists each with
    its reason. Raised after the summary is written; ``report`` holds the aggregation's
    report (``dhm.summary.aggregate.AggregateReport``)."""

    def __init__(self, message: str, report: Any):
        super().__init__(message)
        self.report = report


class SummaryKeptError(RuntimeError):
    """The existing summary has more complete runs than this aggregation: it was kept."""


def shard_name(set_name: str, start: int, stop: int) -> str:
    return f"{set_name}__{start:07d}-{stop:07d}.h5"


def eval_sets(cfg: Any) -> list[tuple[str, str]]:
    """(set name, role) pairs of a run: its test set, its validation split (models with a
    classifier, for temperature scaling), then the OOD sets."""
    return list(
        sets_for(
            cfg.model.name,
            cfg.data.name,
            tuple(cfg.eval.ood_sets or ()),
            tuple(cfg.data.ood_sets or ()),
        )
    )


@functools.lru_cache(maxsize=256)  # a 1,000-run sweep asks for a handful of distinct answers
def sets_for(
    model: str, data: str, eval_ood: tuple[str, ...], data_ood: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    """``eval_sets`` from the settings it depends on (model and data names, the OOD lists)."""

    ood = eval_ood or data_ood or DATASETS[data].ood_sets
    sets = [(data, "id")]
    if model != "vae":
        sets.append((f"{data}-val", "val"))
    return tuple(sets + [(name, "ood") for name in ood])


def expected_size(cfg: Any, set_name: str, role: str) -> int | None:
    """Images the set will have when evaluated (None: not known without reading it)."""

    if role == "val":
        info = DATASETS[cfg.data.name]
        size = info.val_size if cfg.data.val_size is None else cfg.data.val_size
    else:
        size = TEST_SIZES.get(set_name)
    if size is None:
        return None
    cap = cfg.eval.max_images
    return min(size, cap) if cap is not None else size


def names_in(folder: str | Path) -> list[str]:
    """The names in a folder ([] when it does not exist or cannot be read)."""
    try:
        return os.listdir(folder)
    except OSError:
        return []


@dataclass(frozen=True)
class RunFiles:
    """The names one scan of a run folder found: what the launcher decides a run's state from,
    with one listing per subfolder instead of a stat per file it might hold."""

    checkpoints: frozenset[str] = frozenset()  # names in checkpoints/
    shards: tuple[str, ...] = ()  # names in eval/


def scan_runs(run_dirs: list[str]) -> dict[str, RunFiles]:
    """{run dir: RunFiles} with one listing of each parent folder (``<sweep>/runs``), so the
    runs that have no folder yet (a new sweep: all of them) cost nothing more."""
    listed: dict[str, set[str]] = {}
    out: dict[str, RunFiles] = {}
    for run_dir in run_dirs:
        # Not normpath: it would drop "link/.." without following the link, as the OS does.
        parent, name = os.path.split(run_dir.rstrip(os.sep) or run_dir)
        if name in ("", ".", ".."):
            exists = os.path.isdir(run_dir)
        else:
            parent = parent or os.curdir
            if parent not in listed:
                listed[parent] = set(names_in(parent))
            exists = name in listed[parent]
        if not exists:
            out[run_dir] = RunFiles()
            continue
        out[run_dir] = RunFiles(
            frozenset(names_in(os.path.join(run_dir, "checkpoints"))),
            tuple(names_in(os.path.join(run_dir, "eval"))),
        )
    return out


def shard_spans(
    eval_dir: str | Path, set_name: str, names: Iterable[str] | None
) -> list[tuple[int, int, str]]:
    """(start, stop, file name) of a set's shards, by start."""
    return sorted(
        (int(m["start"]), int(m["stop"]), name)
        for name in (names_in(eval_dir) if names is None else names)
        if (m := _SHARD_RE.match(name)) and m["set"] == set_name
    )


def set_complete(
    eval_dir: str | Path,
    set_name: str,
    size: int | None = None,
    names: Iterable[str] | None = None,
) -> bool:
    """True when the set's shard files cover [0, size) without gaps. ``size`` None: read it
    from the first shard (the only case that opens a file). ``names``: the folder's listing."""
    spans = shard_spans(eval_dir, set_name, names)  # no path built unless a shard must be opened
    if not spans:
        return False
    covered = 0
    for start, stop, _ in spans:
        if start != covered:
            return False
        covered = stop
    if size is None or covered != size:
        from dhm.core.shard_attrs import shard_set_size  # h5py: only when a shard must be opened

        size = shard_set_size(Path(eval_dir) / spans[0][2])
    return covered == size


def newest_shard_mtime(sweep_dir: Path, run_ids: list[str] | None = None) -> float:
    """The newest modification time of a shard (or part folder: a shard added to it or
    renamed into it changes the folder's) of the runs."""
    ids = run_ids if run_ids is not None else [p.name for p in (sweep_dir / "runs").glob("*")]
    newest = 0.0
    for rid in ids:
        try:
            for entry in os.scandir(sweep_dir / "runs" / rid / "eval"):
                if entry.name.endswith(".h5") or entry.is_dir():
                    newest = max(newest, entry.stat().st_mtime)
        except OSError:
            continue
    return newest


def plan_estimates(sweep_dir: str | Path) -> dict[str, float]:
    """{run id: device-hours the plan estimated for it}, from plan.json (empty without one)."""
    try:
        return estimates_of(json.loads((Path(sweep_dir) / "plan.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def estimates_of(plan: dict[str, Any]) -> dict[str, float]:
    """{run id: device-hours the plan estimated for it} of a plan as read from plan.json."""
    return {
        str(r["run_id"]): float(r["estimated_hours"])
        for r in plan["runs"]
        if r.get("estimated_hours")
    }


def summary_ok_count(summary_dir: Path) -> int | None:
    """How many ok runs the summary in ``summary_dir`` has (None: no complete summary)."""
    try:
        return int(json.loads((summary_dir / MANIFEST).read_text())["ok"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summary_complete(sweep_dir: str | Path, run_ids: list[str] | None = None) -> tuple[bool, str]:
    """(up to date, in words): a summary is up to date when its manifest lists files that all
    exist and it is newer than every shard of the sweep (of ``run_ids``, if given). The words
    say "complete" only when every run of it is ok; else "partial (k of n runs ok)"."""
    summary = Path(sweep_dir) / "summary"
    try:
        manifest = json.loads((summary / MANIFEST).read_text())
        stamp = (summary / MANIFEST).stat().st_mtime
    except (OSError, ValueError):
        return False, "no summary" if not summary.exists() else "summary incomplete (no manifest)"
    missing = [f for f in manifest.get("files", []) if not (summary / f).exists()]
    if missing:
        return False, f"summary incomplete ({len(missing)} file(s) missing, e.g. {missing[0]})"
    if newest_shard_mtime(Path(sweep_dir), run_ids) > stamp:
        return False, "summary older than the newest evaluation shard"
    ok, runs = manifest.get("ok"), manifest.get("runs")
    if not manifest.get("complete", ok == runs):  # manifests before "complete": ok == runs
        return True, f"summary partial ({ok} of {runs} runs ok)"
    return True, "summary complete"
