"""A sweep's disk use, estimated before anything is submitted, and the temporary files that
killed writers left in it.

``estimate(runs, sweep_dir, snapshot_bytes)`` adds up, without torch or h5py:

* checkpoints: per run, the peak while it trains (``train.keep_checkpoints`` step checkpoints
  and the one being written; ``final.pt`` is written after the last prune) and what stays once
  it is trained (``final.pt``, the epochs of ``train.keep_epochs``, and the step checkpoints
  only with ``train.keep_step_checkpoints``). File sizes come from ``dhm.core.sizes`` (the model's
  state_dict counted from its config, Adam's moments in step checkpoints), or from the files
  themselves where a run folder already has them;
* shards: per run and eval set, the columns ``dhm.evaluation.evaluate`` writes per image times
  the set's images, gzip as ``dhm.evaluation.results.write_shard`` applies it, plus HDF5's
  overhead per file; the sizes of the shards already on disk where there are some;
* the summary (a constant plus per run) and the code snapshots (the caller's number).

``check_quota`` refuses an estimate above ``cluster.disk_quota_gb``. ``sweep_tmp`` removes the
``.<name>.<random>.tmp`` files of ``dhm.core.fsutil.atomic_path`` that no live job can be
writing.
"""

from __future__ import annotations

import functools
import math
import os
import re
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhm.core import checkpoint as ckpt_io
from dhm.core import layout
from dhm.core import variants as V
from dhm.core.config import ConfigError
from dhm.core.datasets import DATASETS, TEST_SIZES
from dhm.core.sizes import checkpoint_bytes, human

GB = 1000**3  # cluster.disk_quota_gb counts GB of 10^9 bytes, as ``DiskEstimate.lines`` prints

# HDF5 shard files (dhm.evaluation.results.write_shard), measured with h5py 3: a file with its
# attributes (config YAML twice, provenance), each dataset's header, each subgroup
# (fgsm/, pgd/, images/); gzip (level 4, shuffled) applies to per-image arrays of more than
# GZIP_MIN elements and keeps about these fractions of their bytes.
SHARD_FILE_BYTES = 10_000
SHARD_DATASET_BYTES = 400
SHARD_GROUP_BYTES = 1_000
GZIP_MIN = 4096
GZIP_KEPT = {"index": 0.06, "pred": 0.3, "float": 0.85}
IMAGE_BYTES = 3 * 32 * 32  # uint8 [3, 32, 32] of images/{inputs,recon,samples}
# summary/: tables, results.h5 and a few plots, then per run its rows and the image grids and
# histograms report_data.json and report.html both hold, and (for at most MAX_PLOT_RUNS runs,
# dhm.summary.aggregate's max_plot_runs) its reliability and -ELBO histogram PNGs; measured on
# digits sweeps of 2 to 24 runs.
SUMMARY_BYTES = 200_000
SUMMARY_RUN_BYTES = 200_000
SUMMARY_PLOT_BYTES = 95_000
MAX_PLOT_RUNS = 12

# dhm.core.fsutil.atomic_path's temporary files: tempfile.mkstemp(prefix=".<name>.",
# suffix=".tmp"), whose random part is 8 characters of [a-z0-9_].
TMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
NEVER_SWEPT = ("code", "slurm")  # a snapshot's files; submitit's live files


@dataclass
class RunCheckpoints:
    """One run's checkpoint bytes: at the peak of its training, and once trained."""

    peak: int
    trained: int
    files: int  # checkpoint files at the peak
    largest: int  # bytes of its largest checkpoint file
    measured: bool  # sizes read from files on disk


@dataclass
class DiskEstimate:
    """Bytes a sweep takes on disk, by part. ``checkpoints`` counts every run at its training
    peak (runs of a sweep may train at once); ``checkpoints_trained`` what stays when all are
    trained. ``total`` adds the parts (with the peak)."""

    checkpoints: int = 0
    shards: int = 0
    summaries: int = 0
    snapshots: int = 0
    checkpoints_trained: int = 0
    runs: int = 0
    per_run: list[RunCheckpoints] = field(default_factory=list, repr=False)
    shards_on_disk: int = 0  # of ``shards``, bytes of shard files that exist

    @property
    def total(self) -> int:
        return self.checkpoints + self.shards + self.summaries + self.snapshots

    def _checkpoint_words(self) -> str:
        if not self.per_run:
            return "no runs"
        files = {r.files for r in self.per_run}
        largest = max(r.largest for r in self.per_run)
        measured = sum(r.measured for r in self.per_run)
        if len(files) == 1 and len({r.largest for r in self.per_run}) == 1:
            words = f"{_count(self.runs, 'run')} x {_count(files.pop(), 'file')} x {human(largest)}"
        else:
            words = (
                f"{_count(self.runs, 'run')} x up to {_count(max(files), 'file')} of up to "
                f"{human(largest)}"
            )
        if measured:
            words += f"; {_count(measured, 'run')} measured on disk"
        return words

    def lines(self) -> list[str]:
        """What the launcher prints: the total with its parts, then what stays once trained."""
        shards = human(self.shards)
        if self.shards_on_disk:
            shards += f" ({human(self.shards_on_disk)} written)"
        code = f"; code snapshots {human(self.snapshots)}" if self.snapshots else ""  # (Slurm)
        return [
            f"disk: ~{human(self.total)} (checkpoints {human(self.checkpoints)}: "
            f"{self._checkpoint_words()}; shards {shards}; summary {human(self.summaries)}{code})",
            f"disk once trained: ~{human(self.total - self.checkpoints + self.checkpoints_trained)}"
            f" (checkpoints {human(self.checkpoints_trained)}: step checkpoints removed unless "
            "train.keep_step_checkpoints)",
        ]


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def estimate(runs: Iterable[Any], sweep_dir: str | Path, snapshot_bytes: int = 0) -> DiskEstimate:
    """The disk a sweep's ``runs`` (``hpc.sweep.Run``: run_id, cfg, run_dir) take under
    ``sweep_dir``, with ``snapshot_bytes`` for the code snapshots. Reads no file: one listing
    of each run folder's checkpoints/ and eval/ and a stat of each file found there."""
    runs = list(runs)
    disk = layout.scan_runs([str(run.cfg.run_dir) for run in runs])
    est = DiskEstimate(runs=len(runs), snapshots=int(snapshot_bytes))
    for run in runs:
        files = disk[str(run.cfg.run_dir)]
        ck = run_checkpoints(run.cfg, files.checkpoints)
        est.per_run.append(ck)
        est.checkpoints += ck.peak
        est.checkpoints_trained += ck.trained
        written, todo = run_shards(run.cfg, files.shards)
        est.shards += written + todo
        est.shards_on_disk += written
    est.summaries = max(summary_bytes(len(runs)), _folder_bytes(Path(sweep_dir) / "summary"))
    return est


def check_quota(
    estimate: DiskEstimate, quota_gb: float | None, key: str = "cluster.disk_quota_gb"
) -> None:
    """ConfigError naming ``key``, the estimate and the quota when the estimate is above
    ``quota_gb`` (GB of 10^9 bytes); None: no quota."""
    if quota_gb is None or estimate.total <= quota_gb * GB:
        return
    raise ConfigError(
        f"{key}={quota_gb:g} is not allowed for this sweep: it needs ~{human(estimate.total)} "
        f"on disk ({estimate.total / GB:.3g} GB: checkpoints {human(estimate.checkpoints)}, "
        f"shards {human(estimate.shards)}, summary {human(estimate.summaries)}, code snapshots "
        f"{human(estimate.snapshots)}), more than the quota of {quota_gb:g} GB; raise {key}, "
        "or shrink the sweep (fewer runs, train.keep_checkpoints)"
    )


# -- checkpoints --------------------------------------------------------------------------------


def _get(section: Any, key: str, default: Any = None) -> Any:
    return section.get(key, default) if hasattr(section, "get") else getattr(section, key, default)


def steps_per_epoch(cfg: Any) -> int:
    """Optimizer steps of one epoch: the training split (less validation) over the batch."""
    info = DATASETS.get(cfg.data.name)
    if info is None:
        return 1
    val = info.val_size if cfg.data.val_size is None else cfg.data.val_size
    return max(1, (info.train_size - val) // max(1, cfg.train.batch_size))


def step_checkpoints_written(cfg: Any, cap: int | None = None) -> int:
    """How many step checkpoints a run writes (at most ``cap``, when given): one every
    train.checkpoint_every_steps global steps and one at every epoch end."""
    t = cfg.train
    per_epoch, every, epochs = (
        steps_per_epoch(cfg),
        int(t.checkpoint_every_steps or 0),
        int(t.epochs),
    )
    if not every:
        return epochs if cap is None else min(epochs, cap)
    n = epochs * per_epoch // every
    for e in range(1, epochs + 1):
        if cap is not None and n >= cap:
            return cap
        n += bool(e * per_epoch % every)  # an epoch end that is not a multiple of the cadence
    return n if cap is None else min(n, cap)


@functools.lru_cache(maxsize=256)
def _formula(model: tuple, data: str, final: bool) -> int:
    return checkpoint_bytes({"model": dict(model), "data": {"name": data}}, final=final)


def formula_bytes(cfg: Any, *, final: bool) -> int:
    """``dhm.core.sizes.checkpoint_bytes``, kept per distinct model (a sweep has a handful)."""
    model = tuple(sorted((k, _hashable(v)) for k, v in dict(cfg.model).items()))
    return _formula(model, cfg.data.name, final)


def _hashable(value: Any) -> Any:
    return (
        tuple(value) if isinstance(value, list) or type(value).__name__ == "ListConfig" else value
    )


def run_checkpoints(cfg: Any, names: Iterable[str] = ()) -> RunCheckpoints:
    """One run's checkpoint bytes from its config, or from the files in its checkpoints/
    (``names``: that folder's listing) where there are some.

    Peak: ``keep_checkpoints`` step checkpoints and the next one being written (the prune
    follows the write), at most as many as the run writes; final.pt comes after the last
    prune and is smaller. Once trained: final.pt, plus ``keep_checkpoints`` step checkpoints
    with ``train.keep_step_checkpoints``. Other files there (a checkpoint set aside) count in
    both.
    """
    t = cfg.train
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    sizes = {name: _size(ckpt_dir / name) for name in names}
    sizes = {name: size for name, size in sizes.items() if size is not None}
    steps = ckpt_io.step_checkpoints(ckpt_dir, sizes)
    step = formula_bytes(cfg, final=False)
    final = formula_bytes(cfg, final=True)
    if steps:  # the newest step checkpoint's size; final.pt scaled as the formula says
        real = sizes[steps[-1][1].name]
        final, step = round(final * real / step), real
    if ckpt_io.FINAL_NAME in sizes:
        final = sizes[ckpt_io.FINAL_NAME]
    keep = int(t.keep_checkpoints)
    kept_steps = bool(_get(t, "keep_step_checkpoints", False))
    other = sum(s for n, s in sizes.items() if n != ckpt_io.FINAL_NAME and not _is_step(n))
    on_disk = sum(sizes.values())
    if ckpt_io.FINAL_NAME in sizes:  # trained: what is there is what stays
        return RunCheckpoints(on_disk, on_disk, len(sizes), max(sizes.values()), True)
    other += final * sum(  # train.keep_epochs: a final-sized file per kept epoch not yet there
        1 for e in _get(t, "keep_epochs", []) or [] if V.checkpoint_file(e) not in sizes
    )
    at_peak = step_checkpoints_written(cfg, cap=keep + 1)
    peak = max(at_peak * step, min(keep, at_peak) * step + final) + other
    trained = final + (min(keep, at_peak) * step if kept_steps else 0) + other
    return RunCheckpoints(max(peak, on_disk), trained, at_peak, step, bool(sizes))


def _is_step(name: str) -> bool:
    return bool(ckpt_io.step_checkpoints("", [name]))


def _size(path: Path) -> int | None:
    """A file's size (one stat); None when it is gone or no plain file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


# -- shards -------------------------------------------------------------------------------------


def shard_columns(cfg: Any, role: str) -> tuple[dict[str, tuple[int, str]], int, int]:
    """What a shard of ``role`` holds per image for run config ``cfg``: {column: (bytes per
    image, kind)}, kind one of ``GZIP_KEPT``'s; and its per-set datasets and subgroups (counts,
    for the HDF5 overhead). Mirrors ``dhm.evaluation.evaluate._evaluate_arrays``."""
    m, e = cfg.model, cfg.eval
    has_vae, has_head = m.name in ("dhm", "vae", "zmodel"), m.name != "vae"
    classes = DATASETS[cfg.data.name].num_classes if cfg.data.name in DATASETS else 10
    cols: dict[str, tuple[int, str]] = {"indices": (8, "index")}
    if role != "ood":
        cols["labels"] = (8, "index")
    if has_vae and role != "val":
        ks = sorted({int(k) for k in e.iwae_k})
        learned = m.likelihood == "gaussian" and m.sigma in ("global", "channel")
        for prefix in ("", "trained_") if learned else ("",):
            cols[f"{prefix}neg_elbo"] = (4, "float")
            for k in ks:
                cols[f"{prefix}neg_iwae_k{k}"] = (4, "float")
        cols["iwae_ess"] = (4, "float")
        if int(m.vae_split_layer) == 0:
            cols["complexity_bits"] = (4, "float")
    if has_head:
        cols["logits"] = (4 * classes, "float")
    per_set, groups = 0, 0
    eps = len(e.fgsm_eps)
    if role == "id" and has_head and eps:
        cols["fgsm/pred"] = (2 * eps, "pred")
        per_set, groups = 2, 1  # fgsm/eps, fgsm/accuracy
        if int(e.pgd_steps):
            cols["pgd/pred"] = (2 * eps, "pred")
            per_set, groups = per_set + 3, groups + 1  # pgd/eps, pgd/accuracy, pgd/steps
    return cols, per_set, groups


def shard_bytes(cfg: Any, role: str, images: int, *, with_grids: bool = False) -> int:
    """Bytes of one shard file of ``images`` images in ``role``; ``with_grids``: the shard
    holding image 0 of the in-distribution set, which keeps eval.images image grids."""
    cols, per_set, groups = shard_columns(cfg, role)
    total = SHARD_FILE_BYTES + SHARD_DATASET_BYTES * (len(cols) + per_set)
    total += SHARD_GROUP_BYTES * groups + 16 * len(cfg.eval.fgsm_eps) * per_set
    for per_image, kind in cols.values():
        raw = per_image * images
        elements = raw // (2 if kind == "pred" else 8 if kind == "index" else 4)
        total += math.ceil(raw * GZIP_KEPT[kind]) if elements > GZIP_MIN else raw
    grids = min(int(cfg.eval.images), images)
    if with_grids and grids and cfg.model.name != "resnet" and int(cfg.model.vae_split_layer) == 0:
        total += 3 * (grids * IMAGE_BYTES + SHARD_DATASET_BYTES) + SHARD_GROUP_BYTES
    return total


def set_bytes(cfg: Any, set_name: str, role: str, covered: Iterable[tuple[int, int]] = ()) -> int:
    """Bytes of the shards of one set still to be written: the set's images
    (``layout.expected_size``) not in the ``covered`` (start, stop) ranges, in shards of
    eval.shard_size images."""
    size = layout.expected_size(cfg, set_name, role)
    if size is None:
        size = min(TEST_SIZES.get(set_name, 10_000), cfg.eval.max_images or 10_000)
    spans = sorted(covered)
    per = int(cfg.eval.shard_size) or size
    total = 0
    for start in range(0, size, per):
        stop = min(start + per, size)
        if any(a <= start and stop <= b for a, b in spans):
            continue
        total += shard_bytes(cfg, role, stop - start, with_grids=role == "id" and start == 0)
    return total


def run_shards(cfg: Any, names: Iterable[str] = ()) -> tuple[int, int]:
    """(bytes of the run's shard files on disk, every variant's, and bytes still to write)
    for the eval sets and checkpoints of its variant (``cfg.eval``); ``names``: the listing of
    its eval/ folder. A (set, checkpoint) counts whole unless all its part folders exist."""
    eval_dir = Path(cfg.run_dir) / "eval"
    listing = V.eval_listing(eval_dir.parent, names) if names else {"": ()}
    written = sum(
        size
        for folder, files in listing.items()
        for name in files
        if name.endswith(".h5") and (size := _size(eval_dir / folder / name)) is not None
    )
    todo = 0
    size = functools.partial(layout.expected_size, cfg)
    for sp in V.set_parts(cfg, V.settings_of(cfg.eval), listing, size=size):
        if set(sp.done) != set(sp.folders):
            todo += set_bytes(cfg, sp.set_name, sp.role, [])
    return written, todo


# -- summary ------------------------------------------------------------------------------------


def summary_bytes(runs: int) -> int:
    """summary/'s bytes for a sweep of ``runs`` runs (see the constants above)."""
    if not runs:
        return 0
    return SUMMARY_BYTES + SUMMARY_RUN_BYTES * runs + SUMMARY_PLOT_BYTES * min(runs, MAX_PLOT_RUNS)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


# -- temporary files ----------------------------------------------------------------------------


def sweep_tmp(
    sweep_dir: str | Path,
    busy_run_ids: Iterable[str],
    sweep_busy: bool,
    max_age_s: float = 3600,
    now: float | None = None,
) -> list[Path]:
    """Delete the temporary files of killed atomic writers (``.<name>.<random>.tmp``, as
    ``dhm.core.fsutil.atomic_path`` names them) under ``sweep_dir`` whose mtime is more than
    ``max_age_s`` seconds old; return their paths.

    Never inside ``runs/<id>/`` of a run in ``busy_run_ids`` (a queued or running job of it may
    be writing there), never outside ``runs/`` when ``sweep_busy`` (an aggregate job may be
    writing the summary or the report), never under ``code/`` (snapshots) or ``slurm/``
    (submitit's files), never a link or anything but a plain file, and nothing else.
    """
    root = Path(sweep_dir)
    busy = set(busy_run_ids)
    now = time.time() if now is None else now
    removed: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        if not rel:
            dirnames[:] = [d for d in dirnames if d not in NEVER_SWEPT]
            if sweep_busy:
                dirnames[:] = [d for d in dirnames if d == "runs"]
                continue  # the sweep folder's own files
        elif rel == ("runs",):
            dirnames[:] = [d for d in dirnames if d not in busy]
        for name in filenames:
            if not TMP_RE.match(name):
                continue
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime <= max_age_s:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed
