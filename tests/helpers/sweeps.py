"""Synthetic sweeps for the aggregation and report tests: runs' eval shards written with
dhm.evaluation.results as dhm.evaluation.evaluate would write them (no training), and plans."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from dhm.core.config import run_config, to_yaml
from dhm.evaluation import results

EPS = np.array([0.0, 0.01, 8 / 255], dtype=np.float32)  # the attacks' epsilon grid
NUM_DIMS = 3 * 32 * 32
ROLE = {"digits": "id", "digits-val": "val", "digits_ood": "ood"}  # set name -> role


def make_arrays(
    seed: int, model: str, n_id: int = 120, n_ood: int = 90, n_val: int = 80
) -> dict[str, dict]:
    """{set: arrays} like dhm.evaluation.evaluate writes for ``model`` (dhm | resnet | vae)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n_id)
    ident: dict[str, np.ndarray] = {"indices": np.arange(n_id), "labels": labels}
    ood: dict[str, np.ndarray] = {"indices": np.arange(n_ood)}
    sets = {"digits": ident, "digits_ood": ood}
    if model != "vae":
        logits = rng.normal(scale=1.5, size=(n_id, 10)).astype(np.float32)
        logits[np.arange(n_id), labels] += rng.uniform(0, 3, n_id).astype(np.float32)
        ident["logits"] = logits * 2.5  # overconfident: temperature scaling has work to do
        ood["logits"] = rng.normal(scale=1.0, size=(n_ood, 10)).astype(np.float32)
        for kind, rates in (("fgsm", [0.1, 0.3, 0.6]), ("pgd", [0.1, 0.5, 0.8])):
            flip = rng.uniform(size=(len(EPS), n_id)) < np.array(rates)[:, None]
            pred = np.where(flip, rng.integers(0, 10, (len(EPS), n_id)), labels[None])
            ident[f"{kind}/pred"] = pred.astype(np.int16)
            ident[f"{kind}/eps"] = EPS
        val_labels = rng.integers(0, 10, n_val)
        val_logits = rng.normal(scale=1.5, size=(n_val, 10)).astype(np.float32)
        val_logits[np.arange(n_val), val_labels] += rng.uniform(0, 3, n_val).astype(np.float32)
        sets["digits-val"] = {
            "indices": np.arange(n_val),
            "labels": val_labels,
            "logits": val_logits * 2.5,
        }
    if model != "resnet":
        for arrays, n, mean in ((ident, n_id, 500), (ood, n_ood, 530)):
            arrays["neg_elbo"] = rng.normal(mean, 20, n).astype(np.float32)
            arrays["neg_iwae_k4"] = arrays["neg_elbo"] - rng.uniform(0, 5, n).astype(np.float32)
            arrays["iwae_ess"] = rng.uniform(1, 4, n).astype(np.float32)
            arrays["complexity_bits"] = rng.normal(9000, 900, n).astype(np.float32)
    return sets


def write_run(
    sweep: Path,
    run_id: str,
    model: str,
    alpha: float,
    beta: float,
    seed: int,
    shards: int = 1,
    sets: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """Write a run's shards (each set split into ``shards`` index ranges); return its arrays."""
    run_dir = sweep / "runs" / run_id
    cfg = run_config(
        **{"run_dir": str(run_dir), "model.name": model, "model.alpha": alpha, "model.beta": beta}
    )
    sets = sets or make_arrays(seed, model)
    # the config names the OOD sets the run has (aggregation checks a run against its config)
    cfg.eval.ood_sets = [name for name in sets if ROLE[name] == "ood"]
    (run_dir / "logs").mkdir(parents=True)
    config_yaml = to_yaml(cfg)
    (run_dir / "config.yaml").write_text(config_yaml)
    for set_name, arrays in sets.items():
        n = len(arrays["indices"])
        bounds = np.linspace(0, n, shards + 1).astype(int)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            part = {
                k: v[:, start:stop]
                if k.endswith("/pred")
                else v
                if k.endswith("/eps")
                else v[start:stop]
                for k, v in arrays.items()
            }
            attrs = {
                "role": ROLE[set_name],
                "set_size": n,
                "start": int(start),
                "stop": int(stop),
                "run_id": run_id,
                "model": model,
                "config_yaml": config_yaml,
                "num_dims": 0 if model == "resnet" else NUM_DIMS,
                "likelihood_space": "" if model == "resnet" else "pixels-dequantized",
            }
            path = run_dir / "eval" / results.shard_name(set_name, int(start), int(stop))
            results.write_shard(path, set_name, part, attrs)
    return sets


# A DHM and a ResNet trained 2 epochs keeping epoch 1, evaluated on a few images: a sweep to
# evaluate again under other variants and checkpoints (tests/test_variants.py, test_report.py).
VARIANT_SWEEP = [
    "sweep=single",
    "sweep.name=var",
    "sweep.points=[{model.beta:1.0},{model.name:resnet,model.alpha:1.0,model.beta:0.0}]",
    "train.epochs=2",
    "train.keep_epochs=[1]",
    "train.progress=false",
    "model.width=4",
    "model.latent_dim=4",
    "eval.iwae_k=[1,2]",
    "eval.fgsm_eps=[0.0,0.05]",
    "eval.pgd_steps=1",
    "eval.max_images=60",
    "eval.batch_size=30",
    "eval.ood_sets=[digits_ood]",
]

GRID = [  # run_id, model, alpha, beta, shards
    ("dhm0001", "dhm", 1.0, 0.01, 3),
    ("dhm0010", "dhm", 1.0, 0.1, 2),
    ("resnet00", "resnet", 1.0, 0.0, 1),
    ("vae00000", "vae", 0.0, 1.0, 2),
]


def write_plan(sweep: Path, runs: list[tuple], keys=("model.name", "model.alpha", "model.beta")):
    plan = {
        "sweep": "test",
        "swept_keys": list(keys),
        "runs": [{"run_id": r[0], "overrides": dict(zip(keys, r[1:4], strict=True))} for r in runs],
    }
    (sweep / "plan.json").write_text(json.dumps(plan))


def add_images(sets: dict[str, dict], seed: int, n: int = 8) -> dict[str, dict]:
    """Give the in-distribution set the image grids evaluate stores (inputs, recon, samples)."""
    rng = np.random.default_rng(seed)
    for kind in ("inputs", "recon", "samples"):
        sets["digits"][f"images/{kind}"] = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return sets


def write_trained(run_dir: Path) -> None:
    """A whole checkpoints/final.pt (a zip with a data.pkl record, as looks_complete reads it)."""
    final = run_dir / "checkpoints" / "final.pt"
    final.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(final, "w") as archive:
        archive.writestr("final/data.pkl", b"x")
