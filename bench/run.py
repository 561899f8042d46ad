"""Run the benchmarks: ``python -m bench.run [--quick] [--width W] [--batch B] [--device D]
[--runs N] [--images N] [--out FILE] [--only NAME,...]``.

Prints one table per benchmark and writes JSON (default ``bench/results/<timestamp>.json``) with
the machine's description. Speeds are reported as ratios against a reference measured in the same
run, so numbers from different machines are not compared directly.

Adding a benchmark: write ``run(args: argparse.Namespace) -> dict`` in a module and register
it in ``BENCHMARKS``. ``args`` carries the resolved options: ``device`` (torch.device),
``quick``, ``width``, ``latent_dim``, ``batch``, ``runs``, ``images``, ``warmup``, ``repeats``,
``steps`` (timed calls per sample), ``seed``, ``fgsm_eps``, ``iwae_k``, ``models`` (None: all
variants), ``compile``, and ``results`` (the
dicts of the benchmarks that already ran, by name, for reuse). The returned dict may hold
``rows`` (a list of flat dicts, printed as a table), ``summary`` (a flat dict, printed as
``key: value`` lines) and anything JSON-serialisable besides, which goes to the JSON only.
``bench.common`` has the timers (``measure``/``median``: warm-up, repeats, CUDA
synchronisation) and the shared fixtures. Modules are imported when their benchmark runs, so
``--only pipeline,train_step,eval_cost,flops`` needs neither Hydra nor submitit (a GPU box
with torch, torchvision, accelerate, omegaconf, h5py and numpy).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import common

Benchmark = Callable[[argparse.Namespace], dict[str, Any]]

# name -> module under bench/ whose ``run(args)`` is the benchmark, in the order they run.
BENCHMARKS: dict[str, str] = {
    "pipeline": "bench.pipeline",
    "train_step": "bench.train_step",
    "eval_cost": "bench.eval_cost",
    "flops": "bench.flops",
    "packing": "bench.packing",
    "launcher": "bench.launcher",
    "aggregate": "bench.aggregate",
}


def benchmark(name: str) -> Benchmark:
    return importlib.import_module(BENCHMARKS[name]).run


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="CPU-sized run (~2 min on 2 cores)")
    p.add_argument("--width", type=int, help="model width (default 64; 8 with --quick)")
    p.add_argument("--batch", type=int, help="global batch (default 400; 64 with --quick)")
    p.add_argument("--runs", type=int, help="grid size of launcher/aggregate (1000; 200)")
    p.add_argument("--images", type=int, help="training set size of pipeline/train_step (10000)")
    p.add_argument("--models", help="train_step/flops variants, e.g. dhm-s0,resnet (default all)")
    p.add_argument("--compile", action="store_true",
                   help="train_step: torch.compile the model (as train.compile=true)")  # fmt: skip
    p.add_argument("--latent-dim", type=int, default=256, dest="latent_dim")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--out", type=Path, help="JSON file (default bench/results/<timestamp>.json)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--repeats", type=int, help="timed samples per measurement (default 5; 3)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 3; 1 with --quick)")
    p.add_argument("--steps", type=int, help="calls per timed sample (default 5; 2 with --quick)")
    p.add_argument("--fgsm-eps", type=int, dest="fgsm_eps", help="E (default: eval config's 10)")
    p.add_argument("--iwae-k", default="1,10,100", dest="iwae_k",
                   help="IWAE sample counts (--quick keeps those <= 10)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    args.device = torch.device(args.device)
    quick = args.quick
    defaults = {"width": (64, 8), "batch": (400, 64), "repeats": (5, 3), "warmup": (3, 1),
                "steps": (5, 2), "runs": (1000, 200), "images": (10_000, 10_000)}  # fmt: skip
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
        if getattr(args, key) < (0 if key == "warmup" else 1):
            p.error(f"--{key} must be positive")
    args.iwae_k = [int(k) for k in args.iwae_k.split(",") if k.strip()]
    if args.compile:
        args.warmup = max(args.warmup, 3)  # the first calls compile forward, then backward
    known = [common.variant_name(*v) for v in common.MODEL_VARIANTS]
    args.models = [m.strip() for m in (args.models or "").split(",") if m.strip()] or None
    if args.models and (bad := [m for m in args.models if m not in known]):
        p.error(f"--models: unknown {', '.join(bad)}; known: {', '.join(known)}")
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            p.error(f"--only: unknown {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    args.names = names
    args.results = {}
    return args


# ---------------------------------------------------------------------------------- printing


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if key.endswith("+-") or key == "MFU":
            return f"{100 * value:.1f}%"
        if key.startswith("ratio") or key.endswith("units") or key == "ratio":
            return f"{value:.2f}x" if key.startswith("ratio") else f"{value:.2f}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    cells = [[_fmt(c, row[c]) if c in row else "" for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    first_left = [True] + [False] * (len(cols) - 1)

    def line(values: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if left else v.rjust(w)
            for v, w, left in zip(values, widths, first_left, strict=True)
        )

    out = [line(cols), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def report(name: str, result: dict[str, Any], seconds: float) -> str:
    parts = [f"== {name} ({seconds:.1f} s)"]
    if result.get("rows"):
        parts.append(format_table(result["rows"]))
    for key, value in result.get("summary", {}).items():
        parts.append(f"  {key}: {_fmt(key, value)}")
    return "\n".join(parts)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    machine = common.machine_info(args.device)
    print(
        f"device {machine['device_name']} | {machine['cpu_cores_usable']} cores "
        f"({machine['cpu_name']}) | torch {machine['torch_version']}, "
        f"{machine['torch_threads']} threads | width {args.width}, batch {args.batch}"
        f"{' | quick' if args.quick else ''}",
        flush=True,
    )
    load = machine["load_average_at_start"]
    if args.device.type == "cpu" and load and load[0] > 0.5 * machine["cpu_cores_usable"]:
        print(f"warning: load average {load[0]} before starting: other processes share the "
              "cores, so CPU timings (and ratios) will be noisy; see the +- columns")  # fmt: skip
    timings = {}
    for name in args.names:
        t0 = time.perf_counter()
        result = benchmark(name)(args)
        timings[name] = time.perf_counter() - t0
        args.results[name] = result
        print("\n" + report(name, result, timings[name]), flush=True)
    total = time.perf_counter() - start
    options = {k: v for k, v in vars(args).items() if k not in ("results", "names")}
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:] if argv is None else argv,
        "options": options,
        "machine": machine,
        "benchmarks": {n: {**args.results[n], "seconds": timings[n]} for n in args.names},
        "total_seconds": total,
        "load_average_at_end": common.load_average(),
    }
    out = args.out or RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    print(f"\ntotal {total:.1f} s; results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
