"""Sweep aggregation: every run's full-set metrics in one summary (CSV, Markdown, HDF5, plots,
report).

``aggregate(sweep_dir)`` reads ``<sweep_dir>/runs/<run_id>/eval/*.h5`` (the shards written by
``dhm.evaluation.evaluate``), merges each set over its shards, computes every metric ONCE over
the full merged set (never per batch: AUROC and ECE do not decompose into batch means), and
writes ``<sweep_dir>/summary/``: results.csv (a row per run), cells.csv (runs that differ only
in train.seed, as mean, std and n), results.md, results.h5, report_data.json (what the report
draws, ``dhm.report.data``), plots/, report.html and, last, manifest.json. Column names, units
and conventions are documented in docs/results.md.

A run whose shards are missing or unreadable is still a row (``status`` missing | corrupt, the
reason in ``problem``, or the reason the launcher gives, e.g. the exception of its failed
training task); every other run is aggregated, the summary is written, and only then
``IncompleteSweepError`` is raised (unless ``allow_partial``), so a batch job exits non-zero.
A summary with fewer complete runs than the one already there is not written unless
``replace_fewer`` (``SummaryKeptError``): refreshing never loses a good summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dhm.core import provenance
from dhm.core import variants as V
from dhm.core.config import Plain, RunConfig
from dhm.core.datasets import DATASETS
from dhm.core.fsutil import atomic_write_text
from dhm.core.layout import (  # noqa: F401 - the errors are part of this module's API
    MANIFEST,
    IncompleteSweepError,
    SummaryKeptError,
    plan_estimates,
    sets_for,
    summary_ok_count,
)
from dhm.core.layout import summary_complete as summary_complete  # re-exported
from dhm.evaluation import results
from dhm.report.data import write_report_data
from dhm.report.page import write_report
from dhm.summary import metrics as M
from dhm.summary.tables import (
    LIKELIHOOD_COLUMNS,
    head_end,
    plain,
    plot_labels,
    write_csv,
    write_h5,
    write_md,
)
from dhm.summary.tables import read_table as read_table  # re-exported: docs/results.md uses it

N_BINS = 15  # reliability bins (top-label, equal width on [0, 1])
HIST_BINS = 50  # -ELBO histogram bins per run
HIST_QUANTILES = (0.001, 0.999)  # histogram range over the pooled sets; outliers go to end bins
HEADLINE_EPS = 8 / 255  # the adversarial column of the headline table
HEADLINE_SCORES = ("msp", "elbo", "complexity")
BOOTSTRAP_REPLICATES = 1000
_NO_PLAN = ("name", "alpha", "beta", "vae_split_layer", "importance_num", "kl_coeff")
NO_PLAN_KEYS = tuple(f"model.{k}" for k in _NO_PLAN)  # setting columns when there is no plan
SEED_KEY = "train.seed"
_SPECIAL_NAMES = {"model.name": "model", "data.name": "dataset"}
_FIXED = (
    "accuracy",
    "nll",
    "brier",
    "ece",
    "mce",
    "temperature",
    "nll_ts",
    "ece_ts",
    *LIKELIHOOD_COLUMNS,
)
_PER_SET = LIKELIHOOD_COLUMNS
_OOD_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")
_STATUS_RANK = {"ok": 0, "missing": 1, "corrupt": 2}
_DEFAULTS = asdict(RunConfig())  # stored configs lacking a (newer) key get its default
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built with it
_SHARD_ATTRS = (
    "num_dims",
    "model",
    "likelihood_space",
    "pixel_levels",
    "sigma_source",
    "bound_sigma",
    "code",
)
PROVENANCE_COLUMNS = ("bound_sigma", "code")  # after the head: neither settings nor metrics


@dataclass
class AggregateReport:
    summary_dir: Path
    rows: list[dict]  # one per run (failed ones too), column -> value (None = empty cell)
    problems: list[tuple[str, str]]  # (run_id, reason)
    cells: list[dict] = field(default_factory=list)  # one per seed cell


@dataclass
class RunSummary:
    """One run's row values and the per-run arrays behind results.h5, the plots and report."""

    run_id: str
    status: str = "ok"
    reasons: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)  # settings, model, dataset
    metrics: dict[str, float] = field(default_factory=dict)
    scores: set[str] = field(default_factory=set)  # OOD scores measured (msp, elbo, ...)
    id_set: str | None = None
    fgsm: tuple[np.ndarray, np.ndarray] | None = None  # eps [E] (pixel units), accuracy [E]
    pgd: tuple[np.ndarray, np.ndarray] | None = None
    reliability: M.Reliability | None = None
    # -ELBO histograms per panel: an OOD set's name (bins over the ID set and that set) or None
    # (every set on one grid); edges [HIST_BINS + 1] in nats, counts [HIST_BINS] per set
    hist_edges: dict[str | None, np.ndarray] = field(default_factory=dict)
    hists: dict[str | None, dict[str, np.ndarray]] = field(default_factory=dict)
    sets: set[str] = field(default_factory=set)  # every set with a shard file, readable or not
    images: dict[str, np.ndarray] = field(default_factory=dict)  # inputs, recon, samples
    codes: set[str] = field(default_factory=set)  # its readable shards' snapshot ids ("": none)
    cell: str = ""  # the settings other than train.seed, as text
    extra: Any = None  # (ID set, msp, ID scores, OOD sets), kept for the bootstrap

    def fail(self, status: str, reason: str) -> None:
        if _STATUS_RANK[status] > _STATUS_RANK[self.status]:
            self.status = status
        if reason not in self.reasons:  # e.g. non-finite logits seen by several metrics
            self.reasons.append(reason)


def format_eps(eps: float) -> str:
    """FGSM column suffix: fixed point with 4 decimals, trailing zeros dropped (8/255 -> 0.0314)."""
    return f"{float(eps):.4f}".rstrip("0").rstrip(".") or "0"


def _score_key(score: str) -> tuple[int, int]:
    if score.startswith("iwae_k"):
        return (2, int(score[6:]))
    return ({"msp": 0, "elbo": 1, "complexity": 3}[score], 0)


def _ood_scores(
    s: results.SetResults, msp: np.ndarray | None = None, num_dims: int = 0
) -> dict[str, np.ndarray]:
    """OOD scores of one set, higher = more in-distribution, each ``[N]`` float64.

    msp is taken as the max log-softmax: a monotone function of max p(y|x), so AUROC/AUPR/FPR95
    are the same, but confident predictions do not collapse into float ties at p = 1.
    complexity (Serra et al. 2020): the PNG length minus the model's code length, both in bits.
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
    if "complexity_bits" in a and "neg_elbo" in a and num_dims:
        model_bits = a["neg_elbo"].astype(np.float64) / math.log(2) + num_dims * math.log2(255)
        out["complexity"] = a["complexity_bits"].astype(np.float64) - model_bits
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


def _temperature(run: RunSummary, ident: results.SetResults, val: results.SetResults) -> None:
    """Temperature fitted on the validation logits; NLL and ECE of the test set after it."""
    t = _guarded(
        run, f"{val.name}/logits", M.fit_temperature, val.arrays["logits"], val.arrays["labels"]
    )
    if t is None:
        return
    scaled, labels = ident.arrays["logits"].astype(np.float64) / t, ident.arrays["labels"]
    ece = M.expected_calibration_error(scaled, labels)
    run.metrics.update(temperature=t, nll_ts=M.nll(scaled, labels), ece_ts=ece)


def _guarded(run: RunSummary, what: str, fn: Any, *args: Any) -> Any:
    """fn(*args); a ValueError (non-finite values, bad shapes) marks the run corrupt instead."""
    try:
        return fn(*args)
    except ValueError as err:
        run.fail("corrupt", f"{what}: {err}")
        return None


Sources = dict[str, list[tuple[str, list[Path]]]]  # set -> [(folder under eval/, its shards)]


def sources(run_dir: Path, cfg: dict | None, variant: V.Variant | None, checkpoint: Any) -> Sources:
    """The shard files of each set's parts of a run under a variant at a checkpoint. Without
    a variant (a sweep without a plan): every shard at the final checkpoint, by folder."""
    listing = V.eval_listing(run_dir)
    if variant is None or not cfg:
        found: dict[str, dict[str, list[Path]]] = {}
        for folder, names in listing.items():
            if folder and not folder.startswith(f"{V.FINAL}-"):
                continue
            for name in sorted(n for n in names if n.endswith(".h5") and "__" in n):
                found.setdefault(name.split("__")[0], {}).setdefault(folder, []).append(
                    run_dir / "eval" / folder / name
                )
        return {name: sorted(parts.items()) for name, parts in found.items()}
    s = {**variant.settings, "checkpoints": [checkpoint]}
    run_cfg = Plain.of({**cfg, "run_dir": str(run_dir), "eval": {**cfg.get("eval", {}), **s}})
    return {
        p.set_name: list(
            zip(
                [""] if p.legacy else list(p.folders.values()),
                V.shard_paths(run_dir, p, listing),
                strict=True,
            )
        )
        for p in V.set_parts(run_cfg, s, listing, legacy_id=V.shard_eval_id)
    }


def _load_sets(run: RunSummary, run_dir: Path, found: Sources) -> dict[str, results.SetResults]:
    """Read and merge every set of a run (its parts' shards); each unreadable shard, gap or
    missing part becomes a reason."""
    if not any(paths for parts in found.values() for _, paths in parts):
        done = (run_dir / "checkpoints" / "final.pt").exists()  # dhm.core.checkpoint.FINAL_NAME
        why = "training finished, not evaluated" if done else "not evaluated or training failed"
        run.fail("missing", f"no eval shards ({why})")
        return {}
    prefix = f"{run_dir}{os.sep}"
    sets = {}
    for name, parts in sorted(found.items()):
        if not any(paths for _, paths in parts):
            continue  # a set without shards: _check_expected_sets says so
        run.sets.add(name)
        read, broken = [], False
        for folder, paths in parts:
            where = f"eval/{folder + '/' if folder else ''}"
            if not paths:
                kind = folder.split("-")[1] if folder else "its"
                run.fail("missing", f"no {kind} shards for set {name} ({where})")
                broken = True
                continue
            shards = []
            for path in paths:
                try:
                    shard = results.read_shard(path, _SHARD_ATTRS)
                except results.ShardError as err:  # names the file; read_shard wraps OSError too
                    run.fail("corrupt", str(err).replace(prefix, ""))
                    broken = True  # don't report the hole it leaves as a gap
                    continue
                shards.append(shard)
                run.codes.add(str(shard.attrs.get("code") or ""))  # absent before shards named it
            read.append((where, shards))
        if broken:
            continue
        try:
            for where, shards in read:
                _check_one_set(shards, name, where)
            sets[name] = results.merge_parts([shards for _, shards in read])
        except results.ShardError as err:
            status = "missing" if isinstance(err, results.ShardGapError) else "corrupt"
            run.fail(status, f"{read[0][0]}{name}__*.h5: {str(err).replace(prefix, '')}")
    return sets


def _check_one_set(shards: list[results.Shard], name: str, where: str) -> None:
    if any(s.set_name != name for s in shards):
        raise results.ShardError(f"{where}: a shard of set {name} holds another set")


def _attack_metrics(run: RunSummary, ident: results.SetResults) -> None:
    a = ident.arrays
    for kind in ("fgsm", "pgd"):
        if f"{kind}/pred" not in a or f"{kind}/eps" not in a or "labels" not in a:
            continue
        acc = _guarded(
            run, f"{ident.name}/{kind}", M.adversarial_accuracy, a[f"{kind}/pred"], a["labels"]
        )
        if acc is None:
            continue
        eps = a[f"{kind}/eps"].astype(np.float64)
        setattr(run, kind, (eps, acc))
        for e, value in zip(eps, acc, strict=True):
            run.metrics[f"{kind}_acc_eps{format_eps(e)}"] = float(value)


def _likelihood_metrics(
    run: RunSummary, sets: dict[str, results.SetResults], ident: results.SetResults
) -> None:
    num_dims = int(ident.attrs.get("num_dims", 0))
    space = ident.attrs.get("likelihood_space", "pixels-dequantized")
    levels = int(ident.attrs.get("pixel_levels", 255))
    elbo = {n: s.arrays["neg_elbo"] for n, s in sets.items() if "neg_elbo" in s.arrays}
    if elbo:
        run.values["bound_sigma"] = bound_sigma(ident.attrs)
        mixed = {n: bound_sigma(sets[n].attrs) for n in elbo}
        if len(set(mixed.values())) > 1:  # ID and OOD bounds under different sigmas
            which = ", ".join(f"{n} {b}" for n, b in sorted(mixed.items()))
            run.fail(
                "corrupt",
                f"bounds under different sigmas ({which}): they do not compare; move the run's "
                "eval/ folder aside and relaunch to evaluate every set again",
            )
    for name, values in elbo.items():
        suffix = "" if name == ident.name else f"_{name}"
        a = sets[name].arrays
        iwae = sorted((k for k in a if k.startswith("neg_iwae_k")), key=lambda k: int(k[10:]))
        bounds = {"": "neg_elbo", "iwae_": iwae[-1] if iwae else None}
        bounds["trained_"] = "trained_neg_elbo"
        for prefix, key in bounds.items():
            if key not in a:
                continue
            mean = float(np.mean(a[key], dtype=np.float64))
            if not math.isfinite(mean):
                run.fail("corrupt", f"{name}/{key}: non-finite values")
                continue
            if not prefix:
                run.metrics[f"neg_elbo_nats{suffix}"] = mean
            if num_dims > 0 and space == "activations":
                run.metrics[f"{prefix}nats_per_dim{suffix}"] = mean / num_dims
            elif num_dims > 0:
                bpd = M.bits_per_dim(mean, num_dims, levels)
                run.metrics[f"{prefix}bits_per_dim{suffix}"] = bpd
        if "complexity_bits" in a and num_dims > 0:  # the PNG codec, the compressor baseline
            png = float(np.mean(a["complexity_bits"], dtype=np.float64)) / num_dims
            run.metrics[f"png_bits_per_dim{suffix}"] = png
        if "iwae_ess" in a:
            run.metrics[f"iwae_ess{suffix}"] = float(np.mean(a["iwae_ess"], dtype=np.float64))
        if iwae:
            gap = np.mean(values.astype(np.float64) - a[iwae[-1]].astype(np.float64))
            run.metrics[f"elbo_iwae_gap{suffix}"] = float(gap)
    _elbo_hists(run, elbo)


def join_codes(codes: set[str] | list[str]) -> str:
    """The ``code`` cell of snapshot ids: sorted, joined by "+" ("" stays a member: "+ab12")."""
    return "+".join(sorted(set(codes)))


def bound_sigma(attrs: dict[str, Any]) -> str:
    """Which sigma a shard's headline bounds use: "fitted" (closed form on images other than
    the test images), "trained" (a learned sigma as trained: shards from before 2026-12-07, or
    of a checkpoint from before) or "fixed" (model.obs_sigma, no split to fit on)."""
    if attrs.get("bound_sigma"):
        return str(attrs["bound_sigma"])
    source = str(attrs.get("sigma_source", ""))
    if source.startswith(("fitted", "fixed")):
        return source.split()[0]
    return "trained"  # "learned", or no source (before sigma_source existed)


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
    run.images = {k[7:]: v for k, v in a.items() if k.startswith("images/")}
    msp = _classifier_metrics(run, ident) if "logits" in a and "labels" in a else None
    val = next((s for s in sets.values() if s.role == "val"), None)
    if msp is not None and val is not None and "logits" in val.arrays:
        _temperature(run, ident, val)
    _attack_metrics(run, ident)
    _likelihood_metrics(run, sets, ident)
    num_dims = int(ident.attrs.get("num_dims", 0))
    score_in = _ood_scores(ident, msp, num_dims)
    for name, s in sets.items():
        if s.role != "ood":
            continue
        for score, out in _ood_scores(s, num_dims=num_dims).items():
            if score not in score_in:
                continue
            om = _guarded(run, f"{name} {score}", M.ood_metrics, score_in[score], out)
            if om is None:
                continue
            run.scores.add(score)
            run.metrics[f"auroc_{name}_{score}"] = om.auroc
            run.metrics[f"aupr_in_{name}_{score}"] = om.aupr_in
            run.metrics[f"aupr_out_{name}_{score}"] = om.aupr_out
            run.metrics[f"fpr95_{name}_{score}"] = om.fpr_at_95_tpr
    run.extra = (ident, msp, score_in, {n: s for n, s in sets.items() if s.role == "ood"})


def _intervals(run: RunSummary, boot: M.Bootstrap, headline: list[str]) -> None:
    """95% intervals of the run's headline metrics (one-seed cells only): Wilson for the
    proportions of test images (accuracy, FGSM and PGD accuracy), else the bootstrap."""
    if run.extra is None:
        return
    ident, msp, score_in, oods = run.extra
    a, tag = ident.arrays, ident.name
    out: dict[str, tuple[float, float]] = {}
    n = len(a["labels"]) if "labels" in a else 0
    if msp is not None:
        correct = a["logits"].argmax(1) == a["labels"]
        out["accuracy"] = M.wilson_interval(int(correct.sum()), n)  # a proportion: Wilson
        out["ece"] = boot.ece(np.exp(msp), correct, tag, N_BINS)
    for kind in ("fgsm", "pgd"):
        col = f"{kind}_acc_eps{format_eps(HEADLINE_EPS)}"
        if col in headline and col in run.metrics and getattr(run, kind) is not None:
            eps = getattr(run, kind)[0]
            e = int(np.argmin(np.abs(eps - HEADLINE_EPS)))
            k = int((a[f"{kind}/pred"][e] == a["labels"]).sum())
            out[col] = M.wilson_interval(k, n)
    for name, s in oods.items():
        scores_out = _ood_scores(s, num_dims=int(ident.attrs.get("num_dims", 0)))
        for score in HEADLINE_SCORES:
            col = f"auroc_{name}_{score}"
            if col in run.metrics and score in scores_out and col in headline:
                out[col] = boot.auroc(
                    score_in[score], scores_out[score], run.metrics[col], tag, name
                )
    for col, (lo, hi) in out.items():
        run.metrics[f"{col}_ci_lo"], run.metrics[f"{col}_ci_hi"] = lo, hi


def _elbo_hists(run: RunSummary, elbo: dict[str, np.ndarray]) -> None:
    """-ELBO histograms (nats) in panels: one per OOD set, binned over the ID set and that set
    alone (a far-OOD set spread over 10^4 nats would leave the ID and near-OOD sets a few of the
    bins), and panel None, every set on one shared grid (results.h5's ``elbo_hist/edges``).

    ``elbo``: set name -> -ELBO per image; the sets other than ``run.id_set`` are the OOD sets
    (validation sets carry no -ELBO).
    """
    finite = {n: v[np.isfinite(v)].astype(np.float64) for n, v in elbo.items()}
    panels: dict[str | None, list[str]] = {None: sorted(finite)}
    if run.id_set in finite:
        panels.update({n: [run.id_set, n] for n in sorted(finite) if n != run.id_set})
    for panel, names in panels.items():
        pooled = np.concatenate([finite[n] for n in names]) if names else np.empty(0)
        if pooled.size == 0:
            continue
        lo, hi = np.quantile(pooled, HIST_QUANTILES)
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, HIST_BINS + 1)
        run.hist_edges[panel] = edges
        run.hists[panel] = {n: np.histogram(np.clip(finite[n], lo, hi), edges)[0] for n in names}


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


@dataclass(frozen=True)
class View:
    """One evaluation of the sweep's runs: a variant (None: no variants recorded) at one
    checkpoint; ``values``: its columns (variant, checkpoint, the settings variants differ in),
    shown when the sweep has several views."""

    variant: V.Variant | None
    checkpoint: Any = V.FINAL
    values: tuple[tuple[str, Any], ...] = ()

    def label(self, run_id: str) -> str:
        """How problems name a run of this view."""
        if not self.values:
            return run_id
        return f"{run_id} ({self.variant.name if self.variant else '-'}, {self.checkpoint})"


def views_of(sweep_dir: Path) -> list[View]:
    """Every variant of the sweep at each of its checkpoints, the default's last checkpoint
    (its final) first; one view without variants when none are recorded."""
    registry = V.read_registry(sweep_dir)
    if not registry:
        return [View(None)]
    keys = [k for k in V.SETTINGS if len({repr(v.settings[k]) for v in registry}) > 1]
    views = []
    for v in registry:
        for c in v.settings["checkpoints"]:
            settings = [(f"eval.{k}", plain(v.settings[k])) for k in keys if k != "checkpoints"]
            values = (("variant", v.name), ("checkpoint", str(c)), *settings)
            views.append(View(v, c, values))
    views.insert(0, views.pop(len(registry[0].settings["checkpoints"]) - 1))
    if len(views) == 1:
        views = [View(views[0].variant, views[0].checkpoint)]
    return views


def summarize_run(
    run_dir: Path,
    run_id: str,
    overrides: dict[str, Any],
    setting_keys: list[tuple[str, str]],
    planned_cfg: dict | None = None,
    view: View | None = None,
) -> RunSummary:
    """Load, merge and measure one run (under ``view``: a variant at a checkpoint); never
    raises for bad shards (they become reasons). ``planned_cfg``: its config in plan.json."""
    view = view or View(None)
    run = RunSummary(run_id)
    variant_cfg = planned_cfg
    if planned_cfg and view.variant is not None:
        variant_cfg = {
            **planned_cfg,
            "eval": {**planned_cfg.get("eval", {}), **view.variant.settings},
        }
    if not run_dir.is_dir():
        run.fail("missing", f"planned run has no folder runs/{run_id}")
        sets: dict[str, results.SetResults] = {}
    else:
        sets = _load_sets(
            run, run_dir, sources(run_dir, variant_cfg, view.variant, view.checkpoint)
        )
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
    run.values.update(view.values)
    run.values["code"] = join_codes(run.codes) if run.codes else None  # None: no shard read
    run.cell = json.dumps(
        {**{k: v for k, v in sorted(overrides.items()) if k != SEED_KEY}, **dict(view.values)},
        default=str,
    )
    if sets:  # the sets the view evaluates (its variant), else those the run was trained with
        _check_expected_sets(run, variant_cfg or config())
    return run


def _check_expected_sets(run: RunSummary, cfg: dict) -> None:
    """A run lacking a set its own config evaluates is incomplete (status missing), even when
    no other run has that set either (every run's OOD evaluation cancelled, say)."""
    model, data = _lookup(cfg, "model.name"), _lookup(cfg, "data.name")
    if not cfg or model is None or data not in DATASETS:
        return
    ood = (tuple(_lookup(cfg, "eval.ood_sets") or ()), tuple(_lookup(cfg, "data.ood_sets") or ()))
    for name, role in sets_for(str(model), str(data), *ood):
        if name not in run.sets:
            run.fail("missing", f"no eval shards for set {name} (its {role} set)")


def _setting_columns(swept_keys: list[str] | None) -> list[tuple[str, str]]:
    """(dotted key, column) of the settings: last key component unless that is ambiguous."""
    keys = list(swept_keys) if swept_keys is not None else list(NO_PLAN_KEYS)
    last = [_SPECIAL_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys]
    reserved = {"run_id", "status", "problem", *PROVENANCE_COLUMNS, "mixed_code", *_FIXED}
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
            if name.endswith("-val") and run.values.get("model") == "vae":
                continue  # a validation set is evaluated for temperature scaling: classifiers only
            if not any(f"for set {name} " in reason for reason in run.reasons):
                run.fail(
                    "missing", f"no eval shards for set {name} (other {run.id_set} runs have it)"
                )


def discover(
    sweep_dir: Path,
) -> tuple[list[str] | None, list[tuple[str, dict, dict | None]], int]:
    """(swept keys or None, [(run_id, overrides, its config as planned or None)], run folders
    not in the plan)."""
    runs_dir = sweep_dir / "runs"
    folders = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    plan_path = sweep_dir / "plan.json"
    if not plan_path.exists():
        if not folders:
            raise FileNotFoundError(f"{sweep_dir}: neither plan.json nor run folders under runs/")
        return None, [(name, {}, None) for name in folders], 0
    try:
        plan = json.loads(plan_path.read_text())
        planned = [
            (str(r["run_id"]), dict(r.get("overrides") or {}), r.get("config"))
            for r in plan["runs"]
        ]
        swept = [str(k) for k in plan.get("swept_keys", [])]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{plan_path}: unreadable plan ({type(err).__name__}: {err})") from None
    ids = {run_id for run_id, *_ in planned}
    return swept, planned, sum(name not in ids for name in folders)


def _columns(
    runs: list[RunSummary], setting_cols: list[tuple[str, str]], view_cols: list[str] = ()
) -> tuple[list[str], list[str]]:
    """(results.csv columns, headline metrics): the documented order, present columns only.

    Headline (results.md subset, heatmaps, report): accuracy, ece, ece after temperature
    scaling, FGSM and PGD accuracy at 8/255 (the largest epsilon if 8/255 is not in the grid),
    and the AUROC of msp, elbo and complexity against every OOD set.
    """
    head = ["run_id", "status", *(col for _, col in setting_cols)]
    head += [c for c in ("model", "dataset") if c not in head]
    head += view_cols  # variant, checkpoint, the settings variants differ in: several views
    if any("bound_sigma" in run.values for run in runs):
        head.append("bound_sigma")  # after dataset: not a setting, not a metric
    head.append("code")  # the snapshot id(s) the run's shards were written by; always there
    present = {c for run in runs for c in run.metrics}
    ood_sets = sorted({n for r in runs for n in r.sets})  # absent columns are dropped below
    scores = sorted({sc for run in runs for sc in run.scores}, key=_score_key)
    metrics = [*_FIXED, *(f"{m}_{o}" for o in ood_sets for m in _PER_SET)]
    metrics += [f"{m}_{o}_{sc}" for m in _OOD_METRICS for o in ood_sets for sc in scores]
    attacks = []
    for kind in ("fgsm", "pgd"):
        eps = sorted(
            {float(e) for r in runs if getattr(r, kind) is not None for e in getattr(r, kind)[0]}
        )
        attacks += list(dict.fromkeys(f"{kind}_acc_eps{format_eps(e)}" for e in eps))
    metrics = [c for c in metrics + attacks if c in present]
    headline = [c for c in ("accuracy", "ece", "ece_ts") if c in present]
    for kind in ("fgsm", "pgd"):
        cols = [c for c in attacks if c.startswith(kind) and c in present]
        want = f"{kind}_acc_eps{format_eps(HEADLINE_EPS)}"
        headline += [want] if want in cols else cols[-1:]
    aurocs = [f"auroc_{o}_{sc}" for o in ood_sets for sc in HEADLINE_SCORES]
    headline += [c for c in aurocs if c in present]
    cis = [f"{c}_ci_{b}" for c in headline for b in ("lo", "hi")]
    return [*head, *metrics, *[c for c in cis if c in present], "problem"], headline


def _add_cost_columns(
    runs: list[RunSummary],
    columns: list[str],
    states: dict[str, dict] | None,
    estimates: dict[str, float],
) -> list[str]:
    """``<unit>_hours`` (what each run's Slurm tasks used, from the launcher's states) and
    ``<unit>_hours_estimated`` (the plan's estimate) before ``problem``, when known."""
    states = states or {}
    used = {rid: st["hours"] for rid, st in states.items() if st.get("hours") is not None}
    if not used and not estimates:
        return columns
    unit = next((st.get("unit") for st in states.values() if st.get("unit")), "gpu").lower()
    extra = []
    if used:
        extra.append(f"{unit}_hours")
    if estimates:
        extra.append(f"{unit}_hours_estimated")
    for run in runs:
        if run.run_id in used:
            run.metrics[f"{unit}_hours"] = float(used[run.run_id])
        if run.run_id in estimates:
            run.metrics[f"{unit}_hours_estimated"] = estimates[run.run_id]
    return [*columns[:-1], *extra, columns[-1]]


def _write_hparams(summary: Path, runs: list[RunSummary], rows: list[dict],
                   settings: list[str], headline: list[str]) -> list[str]:  # fmt: skip
    """One TensorBoard run per sweep run under summary/tensorboard/, holding its settings
    (hparams) and headline metrics, so TensorBoard's HParams tab compares the sweep."""
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    folder = summary / "tensorboard"
    shutil.rmtree(folder, ignore_errors=True)  # derived from the rows: rewritten whole
    written = []
    for run, row in zip(runs, rows, strict=True):
        hparams = {c: row[c] for c in settings if isinstance(row.get(c), int | float | str | bool)}
        hparams["status"] = row["status"]
        metrics = {f"hparam/{m}": float(row[m]) for m in headline if row.get(m) is not None}
        with SummaryWriter(str(folder / run.run_id)) as writer:
            writer.add_hparams(hparams, metrics, run_name=".")
        written.append(f"tensorboard/{run.run_id}")
    return written


def _row(run: RunSummary, columns: list[str]) -> dict[str, Any]:
    cells = {"run_id": run.run_id, "status": run.status, "problem": "; ".join(run.reasons)}
    cells.update(run.values)
    cells.update(run.metrics)
    return {c: cells.get(c) for c in columns}


def seed_cells(
    runs: list[RunSummary], rows: list[dict], setting_cols: list[str], metrics: list[str]
) -> list[dict]:
    """Per cell (runs whose settings other than train.seed agree, in plan order): the cell's
    settings, ``n`` (ok runs), ``runs`` (their ids) and per metric ``<m>_mean``, ``<m>_std``
    (sample std, ddof = 1) and the 95% Student-t interval of the mean over seeds
    ``<m>_ci_lo``/``<m>_ci_hi`` (both empty for n < 2) over the ok runs that have it; ``code``
    (the snapshot ids of its runs' shards, joined) and ``mixed_code`` (more than one of them,
    "" counting as one: its runs, or a run's sets, ran different code)."""
    order: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        order.setdefault(run.cell, []).append(i)
    keep = [c for c in setting_cols if c != "seed" and c != SEED_KEY]
    cells = []
    for members in order.values():
        ok = [i for i in members if rows[i]["status"] == "ok"]
        cell: dict[str, Any] = {c: rows[members[0]].get(c) for c in keep}
        cell.update(n=len(ok), runs=" ".join(rows[i]["run_id"] for i in members))
        codes = {c for i in members for c in runs[i].codes}
        cell.update(code=join_codes(codes) if codes else None, mixed_code=len(codes) > 1)
        for m in metrics:
            vals = np.array([rows[i][m] for i in ok if rows[i].get(m) is not None], np.float64)
            cell[f"{m}_mean"] = float(vals.mean()) if vals.size else None
            cell[f"{m}_std"] = float(vals.std(ddof=1)) if vals.size >= 2 else None
            ci = M.seed_interval(vals)
            cell[f"{m}_ci_lo"], cell[f"{m}_ci_hi"] = ci if ci is not None else (None, None)
        cells.append(cell)
    return cells


@dataclass
class _Measured:
    """A sweep's runs measured and laid out: what every summary file is written from."""

    runs: list[RunSummary]
    rows: list[dict]
    columns: list[str]
    headline: list[str]
    setting_cols: list[str]
    cells: list[dict]
    problems: list[tuple[str, str]]
    ignored: int  # run folders not in the plan
    n_primary: int = 0  # the first view's rows (the default variant, final): plots, curves

    @property
    def n_ok(self) -> int:
        return sum(r["status"] == "ok" for r in self.rows)

    @property
    def primary(self) -> tuple[list[RunSummary], list[dict]]:
        """The runs and rows of the first view: what the per-run curves and plots show."""
        n = self.n_primary or len(self.runs)
        return self.runs[:n], self.rows[:n]


def _measure(
    sweep_dir: Path,
    run_ids: list[str] | None,
    reasons: dict[str, str] | None,
    states: dict[str, dict] | None,
    bootstrap: int,
) -> _Measured:
    """Every planned run (or ``run_ids`` of them) measured under every view (variant and
    checkpoint), as rows (view by view, the default's final first), seed cells and problems."""
    swept, planned, ignored = discover(sweep_dir)
    if run_ids is not None:
        wanted = set(run_ids)
        planned = [p for p in planned if p[0] in wanted]
    setting_keys = _setting_columns(swept)
    views = views_of(sweep_dir) if swept is not None else [View(None)]
    runs, labels = [], []
    for view in views:
        mine = [
            summarize_run(sweep_dir / "runs" / rid, rid, overrides, setting_keys, planned_cfg, view)
            for rid, overrides, planned_cfg in planned
        ]
        _check_sets(mine)
        runs += mine
        labels += [view.label(run.run_id) for run in mine]
    for run in runs:
        why = (reasons or {}).get(run.run_id)
        if why and run.status != "ok":
            run.reasons = [why] + [r for r in run.reasons if not r.startswith("no eval shards")]
    view_cols = [k for k, _ in views[0].values]
    _, headline = _columns(runs, setting_keys, view_cols)
    _bootstrap(runs, headline, bootstrap)
    columns, headline = _columns(runs, setting_keys, view_cols)  # again: with the intervals
    columns = _add_cost_columns(runs, columns, states, plan_estimates(sweep_dir))
    rows = [_row(run, columns) for run in runs]
    metric_cols = [
        c
        for c in columns[head_end(columns) + 1 : -1]
        if "_ci_" not in c and not c.endswith("_hours_estimated") and c not in PROVENANCE_COLUMNS
    ]
    setting_cols = [col for _, col in setting_keys]
    cells = seed_cells(runs, rows, [*setting_cols, *view_cols], metric_cols)
    problems = [
        (label, reason) for run, label in zip(runs, labels, strict=True) for reason in run.reasons
    ]
    return _Measured(runs, rows, columns, headline, setting_cols, cells, problems, ignored,
                     len(planned))  # fmt: skip


def _bootstrap(runs: list[RunSummary], headline: list[str], replicates: int) -> None:
    """Bootstrap intervals of the headline metrics of runs alone in their seed cell."""
    if not replicates:
        return
    sizes: dict[str, int] = {}
    for run in runs:
        sizes[run.cell] = sizes.get(run.cell, 0) + 1
    boot = M.Bootstrap(replicates, seed=0)
    for run in runs:
        if sizes[run.cell] == 1:
            _intervals(run, boot, headline)


def _check_replace(summary: Path, m: _Measured, replace_fewer: bool) -> None:
    """SummaryKeptError when the summary there has more complete runs (unless replace_fewer)."""
    old_ok = summary_ok_count(summary)
    if old_ok is not None and m.n_ok < old_ok and not replace_fewer:
        raise SummaryKeptError(
            f"{summary} has {old_ok} complete runs, this aggregation {m.n_ok}: the summary there "
            f"is kept (problems: {'; '.join(f'{r}: {p}' for r, p in m.problems[:3])}). "
            "Pass replace_summary=true to replace it."
        )


def _write_tables(summary: Path, sweep_dir: Path, m: _Measured) -> list[str]:
    """results.csv, cells.csv, results.md, results.h5 and the report's data; their names."""
    write_csv(summary / "results.csv", m.columns, m.rows)
    write_csv(summary / "cells.csv", list(m.cells[0]) if m.cells else [], m.cells)
    write_md(summary / "results.md", m.columns, m.rows, m.headline, m.problems, m.ignored, m.cells)
    attrs = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sweep": sweep_dir.name,
        "git_commit": provenance.git_commit(),
        "headline": json.dumps(m.headline),
    }
    write_h5(summary / "results.h5", m.columns, m.rows, m.primary[0], m.cells, attrs)
    data = write_report_data(sweep_dir, summary)  # read back from results.h5 and the shards
    return ["results.csv", "cells.csv", "results.md", "results.h5", data.name]


def _write_plots(summary: Path, m: _Measured, max_plot_runs: int) -> list[str]:
    from dhm.summary import plots as P  # matplotlib only when figures are wanted

    runs, rows = m.primary
    labels = plot_labels(runs, m.setting_cols)
    written = P.write_plots(
        summary / "plots", runs, rows, labels, m.headline, max_plot_runs, m.setting_cols
    )
    return [f"plots/{p.name}" for p in written]


def _finish(summary: Path, m: _Measured, files: list[str], allow_partial: bool) -> AggregateReport:
    """Write the manifest (the summary's files are all written; ``complete`` only when every
    run is ok); raise IncompleteSweepError when a run has a problem, unless ``allow_partial``."""
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": len(m.rows),
        "ok": m.n_ok,
        "complete": not m.problems and m.n_ok == len(m.rows),
        "files": files,
        # the code snapshot the aggregation itself ran from ("" outside one)
        "code": str(provenance.snapshot().get("id", "")),
    }
    atomic_write_text(summary / MANIFEST, json.dumps(manifest, indent=1))
    result = AggregateReport(summary, m.rows, m.problems, m.cells)
    if m.problems and not allow_partial:
        lines = "\n".join(f"  {rid}: {reason}" for rid, reason in m.problems)
        raise IncompleteSweepError(
            f"{len({p[0] for p in m.problems})} of {len(m.runs)} runs are incomplete (summary "
            f"written to {summary}; pass allow_partial to accept):\n{lines}",
            result,
        )
    return result


def aggregate(
    sweep_dir: str | Path,
    *,
    allow_partial: bool = False,
    max_plot_runs: int = 12,
    plots: bool = True,
    report: bool = True,
    reasons: dict[str, str] | None = None,
    run_ids: list[str] | None = None,
    summary_dir: str | Path | None = None,
    replace_fewer: bool = False,
    states: dict[str, dict] | None = None,
    bootstrap: int = BOOTSTRAP_REPLICATES,
    tensorboard: bool = True,
) -> AggregateReport:
    """Summarize every run of a sweep into ``<sweep_dir>/summary/`` (see docs/results.md).

    Runs come from ``plan.json`` when present (a planned run without a folder or shards is
    reported missing), else from every folder under ``runs/``; ``run_ids`` keeps a subset.
    ``reasons`` (run id -> text, from the launcher's ledger) replaces the generic reason of a
    run that has no shards; ``states`` (run id -> stage, Slurm state, reason, log tail) goes
    to the report. Problems never stop the other runs; after writing, IncompleteSweepError is
    raised if any run has one, unless ``allow_partial``. ``max_plot_runs`` caps the per-run
    PNGs and the FGSM plot's lines. ``tensorboard`` writes ``summary/tensorboard/<run_id>/``
    with each run's swept settings and headline metrics, for TensorBoard's HParams tab.
    ``report_data.json`` (what the report draws) is always written; ``report`` renders
    ``report.html`` from it.
    """
    sweep_dir = Path(sweep_dir)
    m = _measure(sweep_dir, run_ids, reasons, states, bootstrap)
    summary = Path(summary_dir) if summary_dir is not None else sweep_dir / "summary"
    _check_replace(summary, m, replace_fewer)
    summary.mkdir(parents=True, exist_ok=True)
    (summary / MANIFEST).unlink(missing_ok=True)  # not done until every file is rewritten
    files = _write_tables(summary, sweep_dir, m)
    if plots:
        files += _write_plots(summary, m, max_plot_runs)
    if tensorboard:
        files += _write_hparams(summary, *m.primary, m.setting_cols, m.headline)
    if report:
        write_report(sweep_dir, states=states, summary_dir=summary)
        files.append("report.html")
    return _finish(summary, m, files, allow_partial)
