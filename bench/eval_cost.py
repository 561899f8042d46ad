"""Benchmark ``eval_cost``: FGSM grid and ELBO/IWAE cost in units of one forward pass.

The unit is ``model(x)`` (eval mode, no_grad, one posterior sample through the decoder) of the
same dhm model on the same batch, in fp32 as ``dhm.evaluation.evaluate`` runs it. Expected:

* FGSM over E epsilons (``dhm.evaluation.attacks.fgsm_predictions``): one forward + backward of
  ``classify`` and E - 1 ``classify`` forwards (eps = 0 reuses the clean logits), so at most
  about 2 + E units (``classify`` skips the decoder, so it is cheaper than a unit).
* ELBO/IWAE with k samples (``dhm.evaluation.evaluate._bounds``): one encoder pass and k decoder
passes, the
  k samples batched into each decoder call; reported also in units of one decoder pass.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from bench import common
from dhm.core.config import EvalConfig
from dhm.evaluation.attacks import fgsm_predictions
from dhm.evaluation.evaluate import _bounds

QUICK_MAX_K = 10


def eps_grid(count: int | None) -> list[float]:
    """The eval config's epsilon grid (E = 10); its first ``count`` values, or a linspace."""
    grid = [float(e) for e in EvalConfig().fgsm_eps]
    if count is None or count == len(grid):
        return grid
    if count <= len(grid):
        return grid[:count]
    return torch.linspace(0, 0.1, count).tolist()


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    model, mcfg = common.make_model("dhm", args.width, args.latent_dim, 0, args.seed)
    model = model.to(device).eval()
    data = common.synthetic_set(args.batch, seed=args.seed)
    x = data.images.to(device).float().div_(255)
    y = data.labels.to(device)
    eps = eps_grid(args.fgsm_eps)
    ks = [int(k) for k in args.iwae_k]
    if args.quick:
        ks = [k for k in ks if k <= QUICK_MAX_K] or [1]
    gen = torch.Generator().manual_seed(args.seed)
    noise = {k: torch.randn((k, args.batch, mcfg.latent_dim), generator=gen) for k in ks}
    z = torch.randn(args.batch, mcfg.latent_dim, device=device)

    def no_grad(fn):
        def wrapped():
            with torch.no_grad():
                return fn()

        return wrapped

    def classify_fwd_bwd() -> None:
        xg = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model.classify(xg), y, reduction="sum")
        torch.autograd.grad(loss, xg)

    fns = {
        "fwd": no_grad(lambda: model(x)),
        "cls": no_grad(lambda: model.classify(x)),
        "dec": no_grad(lambda: model.decoder(z)),
        "cls_grad": classify_fwd_bwd,
        "fgsm": lambda: fgsm_predictions(model.classify, x, y, eps),
    }
    for k in ks:
        fns[f"k{k}"] = no_grad(lambda k=k: _bounds(model, x, noise[k], [k], None))
    # Samples alternate between the ops, so a change in machine load hits all of them.
    samples = common.measure_interleaved(
        fns, device=device, warmup=args.warmup, repeats=args.repeats, inner=args.steps
    )
    t = {name: common.median(s) for name, s in samples.items()}
    t_fwd, t_cls, t_dec, t_cls_grad, t_fgsm = (
        t[n] for n in ("fwd", "cls", "dec", "cls_grad", "fgsm")
    )
    e = len(eps)
    n_fwd = sum(1 for v in eps if v != 0)
    rows = [
        {"op": "model(x) [unit]", "ms": 1e3 * t_fwd, "units": 1.0, "expected": "1"},
        {"op": "classify(x)", "ms": 1e3 * t_cls, "units": t_cls / t_fwd, "expected": "< 1"},
        {
            "op": "decoder(z), 1 sample",
            "ms": 1e3 * t_dec,
            "units": t_dec / t_fwd,
            "expected": "< 1",
        },
        {
            "op": "classify fwd+bwd (input grad)",
            "ms": 1e3 * t_cls_grad,
            "units": t_cls_grad / t_fwd,
            "expected": "~2-3x classify",
        },
        {
            "op": f"FGSM grid, E={e}",
            "ms": 1e3 * t_fgsm,
            "units": t_fgsm / t_fwd,
            "expected": f"<= {2 + e} (fwd+bwd + {n_fwd} classify)",
            "model units": (t_cls_grad + n_fwd * t_cls) / t_fwd,
        },
    ]
    bounds = {}
    for k in ks:
        t_k = bounds[k] = t[f"k{k}"]
        rows.append(
            {
                "op": f"ELBO/IWAE k={k}",
                "ms": 1e3 * t_k,
                "units": t_k / t_fwd,
                "expected": f"~ enc + {k} dec passes",
                "model units": (t_cls + k * t_dec) / t_fwd,
                "dec passes": (t_k - (t_fwd - t_dec)) / t_dec,
            }
        )
    fgsm_units = t_fgsm / t_fwd
    summary: dict[str, Any] = {
        "FGSM units": fgsm_units,
        "FGSM bound 2+E": 2 + e,
        "FGSM within bound": fgsm_units <= 2 + e,
    }
    if len(bounds) > 1:
        k_lo, k_hi = min(bounds), max(bounds)
        summary[f"IWAE extra sample cost (k={k_lo}..{k_hi}), dec passes"] = (
            (bounds[k_hi] - bounds[k_lo]) / (k_hi - k_lo) / t_dec
        )
    return {
        "rows": rows,
        "summary": summary,
        "config": {"width": args.width, "batch": args.batch, "eps": eps, "iwae_k": ks},
    }
