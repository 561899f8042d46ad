"""Sweep aggregation: every run's full-set metrics in one summary (CSV, Markdown, HDF5, plots).

``aggregate(sweep_dir)`` reads ``<sweep_dir>/runs/<run_id>/eval/*.h5`` (the shards written by
``dhm.evaluate``), merges each set over its shards, computes every metric ONCE over the full
merged set (never per batch: AUROC and ECE do not decompose into batch means), and writes
``<sweep_dir>/summary/{results.csv, results.md, results.h5, plots/}``. Column names, units and
conventions are documented in docs/results.md.

A run whose shards are missing or unreadable is still a row (``status`` missing | corrupt, the
reason in ``problem``); every other run is aggregated, the summary is written, and only then
``IncompleteSweepError`` is raised (unless ``allow_partial``), so a batch job exits non-zero.
Per run the work is a few vectorized numpy passes over arrays h5py has already read, and the
number of figures is capped, so a 1,000-run sweep costs about what reading its shards costs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dhm import metrics as M
from dhm import results
from dhm.config import RunConfig
from dhm.summary_io import plain, plot_labels, write_csv, write_h5, write_md
from dhm.summary_io import read_table as read_table  # re-exported: docs/results.md uses it

N_BINS = 15  # reliability bins (top-label, equal width on [0, 1])
HIST_BINS = 50  # -ELBO histogram bins per run
HIST_QUANTILES = (0.001, 0.999)  # histogram range over the pooled sets; outliers go to end bins
_NO_PLAN = ("name", "alpha", "beta", "vae_split_layer", "importance_num", "kl_coeff")
NO_PLAN_KEYS = tuple(f"model.{k}" for k in _NO_PLAN)  # setting columns when there is no plan
_SPECIAL_NAMES = {"model.name": "model", "data.name": "dataset"}
_FIXED = ("accuracy", "nll", "brier", "ece", "mce", "neg_elbo_nats", "bits_per_dim")
_STATUS_RANK = {"ok": 0, "missing": 1, "corrupt": 2}
_DEFAULTS = asdict(RunConfig())  # stored configs lacking a (newer) key get its default
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster per run
_SHARD_ATTRS = ("num_dims", "model")  # read besides the checked ones; config_yaml only if needed


class IncompleteSweepError(RuntimeError):
    """Some runs are missing or corrupt; the message lists each with its reason.

    Raised after the summary is written; ``report`` holds the :class:`AggregateReport`.
    """

    def __init__(self, message: str, report: AggregateReport):
        super().__init__(message)
        self.report = report


@dataclass
class AggregateReport:
    summary_dir: Path
    rows: list[dict]  # one per run (failed ones too), column -> value (None = empty cell)
    problems: list[tuple[str, str]]  # (run_id, reason)


@dataclass
class RunSummary:
    """One run's row values and the per-run arrays behind results.h5 and the plots."""

    run_id: str
    status: str = "ok"
    reasons: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)  # settings, model, dataset
    metrics: dict[str, float] = field(default_factory=dict)
    scores: set[str] = field(default_factory=set)  # OOD scores measured (msp, elbo, ...)
    id_set: str | None = None
    fgsm: tuple[np.ndarray, np.ndarray] | None = None  # eps [E] (pixel units), accuracy [E]
    reliability: M.Reliability | None = None
    hist_edges: np.ndarray | None = None  # [HIST_BINS + 1] nats, shared by the sets
    hists: dict[str, np.ndarray] = field(default_factory=dict)  # set -> counts [HIST_BINS]
    sets: set[str] = field(default_factory=set)  # every set with a shard file, readable or not

    def fail(self, status: str, reason: str) -> None:
        if _STATUS_RANK[status] > _STATUS_RANK[self.status]:
            self.status = status
        if reason not in self.reasons:  # e.g. non-finite logits seen by several metrics
            self.reasons.append(reason)


def format_eps(eps: float) -> str:
    """FGSM column suffix: fixed point with 4 decimals, trailing zeros dropped (8/255 -> 0.0314)."""
    return f"{float(eps):.4f}".rstrip("0").rstrip(".") or "0"


def _score_key(score: str) -> tuple[int, int]:
    return (2, int(score[6:])) if score.startswith("iwae_k") else ({"msp": 0, "elbo": 1}[score], 0)


def _ood_scores(s: results.SetResults, msp: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """OOD scores of one set, higher = more in-distribution, each ``[N]`` float64.

    msp is taken as the max log-softmax: a monotone function of max p(y|x), so AUROC/AUPR/FPR95
    are the same, but confident predictions do not collapse into float ties at p = 1.
    """
    a, out = s.arrays, {}
    if msp is not None:
        out["msp"] = msp
    elif "logits" in a:
        x = a["logits"].astype(np.float64)
        z = x - x.max(axis=1, keepdims=True)
        out["msp"] = -np.log(np.exp(z).sum(axis=1))
    if "neg_elbo" in a:
        out["elbo"] = -a["neg_elbo"].astype(np.float64)
    for key in sorted((k for k in a if k.startswith("neg_iwae_k")), key=lambda k: int(k[10:])):
        out["iwae_k" + key[10:]] = -a[key].astype(np.float64)
    return out


def _classifier_metrics(run: RunSummary, ident: results.SetResults) -> np.ndarray | None:
    """accuracy, nll, brier, ece, mce and reliability of the ID set in one pass; its msp score.

    M.accuracy validates the inputs; the rest repeats the operations of M.nll, M.brier_score,
    M.reliability and _ood_scores on one softmax, so the values are the same bit for bit.
    """
    logits, labels = ident.arrays["logits"], ident.arrays["labels"]
    acc = _guarded(run, f"{ident.name}/logits", M.accuracy, logits, labels)
    if acc is None:
        return None
    x, y = logits.astype(np.float64), labels.astype(np.int64)
    rows, z = np.arange(y.shape[0]), x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=1)
    lse, p = np.log(total), e / total[:, None]  # p: M.softmax(x)
    p[rows, y] -= 1.0
    conf = np.minimum(1.0 / total, 1.0)
    run.reliability = rel = M.reliability_from_confidence(conf, x.argmax(axis=1) == y, N_BINS)
    nll, brier = np.mean(lse - z[rows, y]), np.mean(np.einsum("nc,nc->n", p, p))
    run.metrics.update(accuracy=acc, nll=float(nll), brier=float(brier), ece=rel.ece, mce=rel.mce)
    return -lse


def _guarded(run: RunSummary, what: str, fn: Any, *args: Any) -> Any:
    """fn(*args); a ValueError (non-finite values, bad shapes) marks the run corrupt instead."""
    try:
        return fn(*args)
    except ValueError as err:
        run.fail("corrupt", f"{what}: {err}")
        return None


def _load_sets(run: RunSummary, run_dir: Path) -> dict[str, results.SetResults]:
    """Read and merge every set of a run; each unreadable shard or gap becomes a reason."""
    paths = sorted((run_dir / "eval").glob("*.h5"))
    if not paths:
        done = (run_dir / "checkpoints" / "final.pt").exists()  # dhm.checkpoint.FINAL_NAME
        why = "training finished, not evaluated" if done else "not evaluated or training failed"
        run.fail("missing", f"no eval shards ({why})")
        return {}
    by_set: dict[str, list[results.Shard]] = {}
    broken: set[str] = set()
    prefix = f"{run_dir}{os.sep}"
    for path in paths:
        run.sets.add(path.name.split("__")[0])
        try:
            shard = results.read_shard(path, _SHARD_ATTRS)
        except results.ShardError as err:  # names the file; read_shard wraps OSError too
            run.fail("corrupt", str(err).replace(prefix, ""))
            broken.add(path.name.split("__")[0])  # don't report the hole it leaves as a gap
            continue
        by_set.setdefault(shard.set_name, []).append(shard)
    sets = {}
    for name, shards in sorted(by_set.items()):
        if name in broken:
            continue
        try:
            sets[name] = results.merge_shards(shards)
        except results.ShardError as err:
            status = "missing" if isinstance(err, results.ShardGapError) else "corrupt"
            run.fail(status, f"eval/{name}__*.h5: {str(err).replace(prefix, '')}")
    return sets


def _set_metrics(run: RunSummary, sets: dict[str, results.SetResults]) -> None:
    """Every metric of one run over its full merged sets (see docs/results.md for columns)."""
    ids = [s for s in sets.values() if s.role == "id"]
    if not ids and run.reasons:  # already explained (no shards, unreadable ID shard)
        return
    if len(ids) != 1:
        run.fail("missing", f"{len(ids)} in-distribution sets (role id) among the eval shards")
        return
    ident = ids[0]
    run.id_set = ident.name
    a = ident.arrays
    num_dims = int(ident.attrs.get("num_dims", 0))
    msp = _classifier_metrics(run, ident) if "logits" in a and "labels" in a else None
    if "fgsm/pred" in a and "fgsm/eps" in a and "labels" in a:
        acc = _guarded(
            run, f"{ident.name}/fgsm", M.adversarial_accuracy, a["fgsm/pred"], a["labels"]
        )
        if acc is not None:
            eps = a["fgsm/eps"].astype(np.float64)
            run.fgsm = (eps, acc)
            for e, value in zip(eps, acc, strict=True):
                run.metrics[f"fgsm_acc_eps{format_eps(e)}"] = float(value)

    elbo = {n: s.arrays["neg_elbo"] for n, s in sets.items() if "neg_elbo" in s.arrays}
    for name, values in elbo.items():
        suffix = "" if name == ident.name else f"_{name}"
        mean = float(np.mean(values, dtype=np.float64))
        if not math.isfinite(mean):
            run.fail("corrupt", f"{name}/neg_elbo: non-finite values")
            continue
        run.metrics[f"neg_elbo_nats{suffix}"] = mean
        if num_dims > 0:
            run.metrics[f"bits_per_dim{suffix}"] = M.bits_per_dim(mean, num_dims)
    _elbo_hists(run, elbo)

    score_in = _ood_scores(ident, msp)
    for name, s in sets.items():
        if s.role != "ood":
            continue
        for score, out in _ood_scores(s).items():
            if score not in score_in:
                continue
            om = _guarded(run, f"{name} {score}", M.ood_metrics, score_in[score], out)
            if om is None:
                continue
            run.scores.add(score)
            run.metrics[f"auroc_{name}_{score}"] = om.auroc
            run.metrics[f"aupr_in_{name}_{score}"] = om.aupr_in
            run.metrics[f"fpr95_{name}_{score}"] = om.fpr_at_95_tpr


def _elbo_hists(run: RunSummary, elbo: dict[str, np.ndarray]) -> None:
    """-ELBO histograms of every set on one shared grid (nats), so ID and OOD compare."""
    finite = {n: v[np.isfinite(v)] for n, v in elbo.items()}
    pooled = np.concatenate([v for v in finite.values()]) if finite else np.empty(0)
    if pooled.size == 0:
        return
    lo, hi = np.quantile(pooled.astype(np.float64), HIST_QUANTILES)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    run.hist_edges = np.linspace(lo, hi, HIST_BINS + 1)
    for name, v in finite.items():
        run.hists[name] = np.histogram(np.clip(v, lo, hi), run.hist_edges)[0]


def _lookup(cfg: dict, dotted: str) -> Any:
    """Value of a dotted key in a stored config, else the schema default, else None."""
    for source in (cfg, _DEFAULTS):
        node: Any = source
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    return None


def _stored_config(run_dir: Path, sets: dict[str, results.SetResults]) -> dict:
    """The training config of a run: a shard's config_yaml, else <run_dir>/config.yaml."""
    text = None
    for s in sets.values():  # the first set whose shard has one (read only now: rarely needed)
        with contextlib.suppress(OSError, KeyError, ValueError):
            text = text or results.read_attrs(s.shard_paths[0], ["config_yaml"]).get("config_yaml")
    if text is None and (run_dir / "config.yaml").is_file():
        text = (run_dir / "config.yaml").read_text()
    try:
        cfg = yaml.load(text, Loader=_YAML_LOADER) if text else None
    except yaml.YAMLError:
        cfg = None
    return cfg if isinstance(cfg, dict) else {}


def summarize_run(
    run_dir: Path, run_id: str, overrides: dict[str, Any], setting_keys: list[tuple[str, str]]
) -> RunSummary:
    """Load, merge and measure one run; never raises for bad shards (they become reasons)."""
    run = RunSummary(run_id)
    if not run_dir.is_dir():
        run.fail("missing", f"planned run has no folder runs/{run_id}")
        sets: dict[str, results.SetResults] = {}
    else:
        sets = _load_sets(run, run_dir)
        _set_metrics(run, sets)
    cfg: dict | None = None

    def config() -> dict:  # parsed only when a value is not in the plan or the shards
        nonlocal cfg
        if cfg is None:
            cfg = _stored_config(run_dir, sets) if run_dir.is_dir() else {}
        return cfg

    def stored(key: str) -> Any:  # None (not the schema default) when there is no config
        return plain(_lookup(config(), key)) if config() else None

    for key, col in setting_keys:
        run.values[col] = plain(overrides[key]) if key in overrides else stored(key)
    if "model" not in run.values:
        model = next((s.attrs["model"] for s in sets.values() if "model" in s.attrs), None)
        run.values["model"] = model if model is not None else stored("model.name")
    if "dataset" not in run.values:
        run.values["dataset"] = run.id_set or stored("data.name")
    return run


def _setting_columns(swept_keys: list[str] | None) -> list[tuple[str, str]]:
    """(dotted key, column) of the settings: last key component unless that is ambiguous."""
    keys = list(swept_keys) if swept_keys is not None else list(NO_PLAN_KEYS)
    last = [_SPECIAL_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys]
    reserved = {"run_id", "status", "problem", *_FIXED}
    return [
        (k, name if last.count(name) == 1 and name not in reserved else k)
        for k, name in zip(keys, last, strict=True)
    ]


def _check_sets(runs: list[RunSummary]) -> None:
    """A run lacking a set that other runs on its dataset have is incomplete (status missing)."""
    have: dict[str, set[str]] = {}
    for run in runs:
        if run.id_set is not None:
            have.setdefault(run.id_set, set()).update(run.sets)
    for run in runs:
        for name in sorted(have.get(run.id_set or "", set()) - run.sets):
            run.fail("missing", f"no eval shards for set {name} (other {run.id_set} runs have it)")


def _discover(sweep_dir: Path) -> tuple[list[str] | None, list[tuple[str, dict]], int]:
    """(swept keys or None, [(run_id, overrides)], run folders not in the plan)."""
    runs_dir = sweep_dir / "runs"
    folders = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    plan_path = sweep_dir / "plan.json"
    if not plan_path.exists():
        if not folders:
            raise FileNotFoundError(f"{sweep_dir}: neither plan.json nor run folders under runs/")
        return None, [(name, {}) for name in folders], 0
    try:
        plan = json.loads(plan_path.read_text())
        planned = [(str(r["run_id"]), dict(r.get("overrides") or {})) for r in plan["runs"]]
        swept = [str(k) for k in plan.get("swept_keys", [])]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{plan_path}: unreadable plan ({type(err).__name__}: {err})") from None
    ids = {run_id for run_id, _ in planned}
    return swept, planned, sum(name not in ids for name in folders)


def _columns(
    runs: list[RunSummary], setting_cols: list[tuple[str, str]]
) -> tuple[list[str], list[str]]:
    """(results.csv columns, headline metrics): the documented order, present columns only.

    Headline (results.md subset, heatmaps): accuracy, ece, FGSM accuracy at the largest eps and
    the AUROC of every score against the first (alphabetical) OOD set.
    """
    head = ["run_id", "status", *(col for _, col in setting_cols)]
    head += [c for c in ("model", "dataset") if c not in head]
    present = {c for run in runs for c in run.metrics}
    sets = sorted({name for run in runs for name in run.sets})
    scores = sorted({sc for run in runs for sc in run.scores}, key=_score_key)
    eps = sorted({float(e) for run in runs if run.fgsm is not None for e in run.fgsm[0]})
    fgsm = list(dict.fromkeys(f"fgsm_acc_eps{format_eps(e)}" for e in eps))
    metrics = [*_FIXED, *(f"{m}_{o}" for o in sets for m in ("neg_elbo_nats", "bits_per_dim"))]
    metrics += [
        f"{m}_{o}_{sc}" for m in ("auroc", "aupr_in", "fpr95") for o in sets for sc in scores
    ]
    metrics = [c for c in metrics + fgsm if c in present]
    aurocs: list[str] = []
    for o in sets:  # the first OOD set (alphabetical) with any AUROC
        aurocs = aurocs or [c for c in (f"auroc_{o}_{sc}" for sc in scores) if c in present]
    fgsm = [c for c in fgsm if c in present]
    headline = [c for c in ("accuracy", "ece") if c in present] + fgsm[-1:] + aurocs
    return [*head, *metrics, "problem"], headline


def _row(run: RunSummary, columns: list[str]) -> dict[str, Any]:
    cells = {"run_id": run.run_id, "status": run.status, "problem": "; ".join(run.reasons)}
    cells.update(run.values)
    cells.update(run.metrics)
    return {c: cells.get(c) for c in columns}


def aggregate(
    sweep_dir: str | Path,
    *,
    allow_partial: bool = False,
    max_plot_runs: int = 12,
    plots: bool = True,
) -> AggregateReport:
    """Summarize every run of a sweep into ``<sweep_dir>/summary/`` (see docs/results.md).

    Runs come from ``plan.json`` when present (a planned run without a folder or shards is
    reported missing), else from every folder under ``runs/``. Problems never stop the other
    runs; after writing, ``IncompleteSweepError`` is raised if any run has one, unless
    ``allow_partial``. ``max_plot_runs`` caps the per-run figures and the FGSM plot's lines.
    """
    sweep_dir = Path(sweep_dir)
    swept, planned, ignored = _discover(sweep_dir)
    setting_keys = _setting_columns(swept)
    runs = [
        summarize_run(sweep_dir / "runs" / rid, rid, overrides, setting_keys)
        for rid, overrides in planned
    ]
    _check_sets(runs)
    columns, headline = _columns(runs, setting_keys)
    rows = [_row(run, columns) for run in runs]
    problems = [(run.run_id, reason) for run in runs for reason in run.reasons]

    summary = sweep_dir / "summary"
    summary.mkdir(parents=True, exist_ok=True)
    write_csv(summary / "results.csv", columns, rows)
    write_md(summary / "results.md", columns, rows, headline, problems, ignored)
    write_h5(summary / "results.h5", columns, rows, runs)
    if plots:
        from dhm import plots as P  # matplotlib only when figures are wanted

        labels = plot_labels(runs, [col for _, col in setting_keys])
        P.write_plots(summary / "plots", runs, rows, labels, headline, max_plot_runs)
    report = AggregateReport(summary, rows, problems)
    if problems and not allow_partial:
        lines = "\n".join(f"  {rid}: {reason}" for rid, reason in problems)
        raise IncompleteSweepError(
            f"{len({p[0] for p in problems})} of {len(runs)} runs are incomplete (summary "
            f"written to {summary}; pass allow_partial to accept):\n{lines}",
            report,
        )
    return report
