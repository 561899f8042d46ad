"""Launcher: a ``--runs``-run grid (1,000), planned in process and through the command line.

In process: compose, expand (run ids), plan (disk + ledger), arrays, rendered scripts, and the
sbatch calls the grid needs. Reference in the same run for the call count: the thesis
workflow, one hand-written sbatch script per run and stage (train + one eval per set).

Command line (issue 18's target: under 1 s each on these 2-core machines), wall seconds, with
``python -c "import hydra, omegaconf"`` in the same run as the reference:

* ``python launch.py ... mode=dry_run`` of the grid (compose, expand, plan, preflight,
  ``sbatch --test-only`` of every array, the scripts), and ``mode=status`` of its stored plan;
* the same sweep in flight: every run's folder written as the stages leave them (half done with
  every shard, some evaluating, training with step checkpoints and long metrics.csv files,
  failed with a pickled exception, pending), the ledger of its six sbatch calls, and
  sacct/squeue answering for every task: ``mode=status`` and the relaunch's ``mode=dry_run``,
  each also without one speed layer at a time (``ABLATIONS``: the kept file facts, the checkpoint
  reader that reads only a zip's end), to show what each is worth;
* the study's grid: ``sweep=alpha_beta`` with 100 seeds (1,002 runs) and CIFAR-10, CIFAR-100
  and SVHN files of their full sizes in torchvision's formats under ``data.root``.

Slurm's commands are tests/helpers/fake_slurm.py, started with ``python -IS`` (~8 ms, where the
real C programs take a few), so the figure is the launcher's own time, not the controller's
latency (which a real cluster adds once per command: the launcher runs them concurrently).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from dhm.core import variants as V
from dhm.core.layout import eval_sets, expected_size, shard_name
from hpc import ledger, snapshot
from hpc.arrays import arrays_for
from hpc.cli import compose_config
from hpc.launcher import print_arrays
from hpc.plan import make_plan
from hpc.schema import check_launch
from hpc.sweep import Run, expand, sweep_dir, write_plan
from tests.helpers.fake_slurm import install as install_fake_slurm

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT: dict[str, Any] = {}  # the code snapshot's size and cost, filled by _in_process


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _grid(runs: int) -> list[str]:
    betas = ["1e-4", "1e-3", "1e-2", "1e-1", "1", "10", "100", "1e3", "1e4", "1e5"]
    betas = betas[: min(len(betas), runs)]
    seeds = -(-runs // len(betas))  # a seeds x betas grid of at least --runs runs
    return [
        "sweep=demo",
        "sweep.name=bench",
        "sweep.points=[]",
        f"+sweep.axes={{train.seed:[{','.join(map(str, range(seeds)))}],"
        f"model.beta:[{','.join(betas)}]}}",
    ]


def _fake_slurm(folder: Path) -> dict[str, str]:
    install_fake_slurm(folder)
    return {
        **os.environ,
        "PATH": f"{folder}:{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(folder / "sbatch.log"),
    }


def _interleaved(cases: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Median wall seconds of each command, {name: (cmd, env, before)}, sampled in turns (one
    of each per round), so that a slow spell of a shared machine hits them all alike;
    ``before()`` runs ahead of a sample, untimed."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (cmd, env, before) in cases.items():
            if before is not None:
                before()
            start = time.perf_counter()
            out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            samples[name].append(time.perf_counter() - start)
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:4])} ... failed: {out.stderr[-500:]}")
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


# ------------------------------------------------------------------ a sweep in flight, on disk

# What each tenth of the runs is doing: done (5), evaluating (2), training, failed, pending.
_PHASES = ("done",) * 5 + ("evaluating",) * 2 + ("training", "failed", "pending")


# Records in a DHM checkpoint as training writes it (weights, buffers and Adam's state: the
# launcher reads the archive's directory to tell a whole checkpoint from a truncated one).
CHECKPOINT_RECORDS = 941


def _zip(path: Path, template: Path) -> None:
    """A checkpoint with a torch archive's layout and record count (tiny records), written once
    and hard-linked into each run."""
    if not template.exists():
        with zipfile.ZipFile(template, "w") as archive:
            archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
            for i in range(CHECKPOINT_RECORDS - 2):
                archive.writestr(f"archive/data/{i}", bytes(64))
            archive.writestr("archive/version", b"3\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.link(template, path)


def _shard(path: Path, current: str) -> Path:
    """An HDF5 file with the attributes the launcher reads of a shard (status reads its name
    only; a relaunch reads its eval_id to find shards of other eval settings)."""
    if not path.exists():
        import h5py

        with h5py.File(path, "w") as f:
            f.attrs["eval_id"] = current
            f.attrs["schema_version"] = 2
    return path


def _metrics(path: Path, steps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["step,epoch,loss,ce,neg_elbo,lr"]
    rows += [f"{s},{s // 50},{2.5 - s * 1e-4:.6f},0.9,3000.5,0.001" for s in range(steps)]
    path.write_text("\n".join(rows) + "\n")


def _populate(cfg: Any, runs: list[Run], folder: Path) -> dict[str, str]:
    """Write the sweep's run folders, ledger and Slurm answers as they are mid-flight; return
    the environment variables that make the fake sacct/squeue answer for its tasks."""
    sets = eval_sets(runs[0].cfg)
    train_job, first_eval_job = 5000, 5001
    tasks = [{"runs": [r.run_id]} for r in runs]
    ledger.record_submission(cfg, "train", str(train_job), tasks, None)
    for k, (name, _) in enumerate(sets):
        ledger.record_submission(
            cfg,
            f"eval:{name}",
            str(first_eval_job + k),
            [{"runs": [r.run_id], "set": name} for r in runs],
            f"aftercorr:{train_job}",
        )
    slurm_dir = sweep_dir(cfg) / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    sacct, squeue = [], []
    for i, run in enumerate(runs):
        phase = _PHASES[i % len(_PHASES)]
        rd = run.run_dir
        train_state = {"training": "RUNNING", "failed": "FAILED", "pending": "PENDING"}.get(
            phase, "COMPLETED"
        )
        exit_code = "1:0" if phase == "failed" else "0:0"
        sacct.append(
            f"{train_job}_{i}|{train_state}|{exit_code}|3600|node{1 + i % 2}|4000M|"
            "billing=2,cpu=2,mem=4000M,node=1|None|2026-12-01T00:00:00|2026-12-01T01:00:00"
        )
        if phase != "pending":
            _metrics(rd / "logs" / "metrics.csv", 300 if phase != "training" else 5000)
            (slurm_dir / f"{train_job}_{i}_0_log.out").write_text("started\n")
        if phase == "failed":
            (slurm_dir / f"{train_job}_{i}_0_log.err").write_text("ValueError: boom\n")
            with open(slurm_dir / f"{train_job}_{i}_0_result.pkl", "wb") as f:
                trace = 'Traceback:\n  File "x.py", line 1\nValueError: boom\n'
                pickle.dump(("error", trace), f)
        if phase == "training":
            _zip(rd / "checkpoints" / "step_000001000.pt", folder / "checkpoint.pt")
            _zip(rd / "checkpoints" / "step_000002000.pt", folder / "checkpoint.pt")
        if phase in ("done", "evaluating"):
            _zip(rd / "checkpoints" / "final.pt", folder / "checkpoint.pt")
        for k, (name, role) in enumerate(sets):
            job = f"{first_eval_job + k}_{i}"
            written = phase == "done" or (phase == "evaluating" and k < len(sets) // 2)
            if written:
                size = expected_size(run.cfg, name, role)
                path = rd / "eval" / shard_name(name, 0, size)
                path.parent.mkdir(parents=True, exist_ok=True)
                os.link(
                    _shard(folder / "shard.h5", V.legacy_eval_id(V.settings_of(run.cfg.eval))), path
                )
                state = "COMPLETED"
            else:
                state = "RUNNING" if phase == "evaluating" else "PENDING"
            sacct.append(f"{job}|{state}|0:0|60|node1|2000M|cpu=1,mem=2000M,node=1|None||")
            if state == "PENDING":
                squeue.append(f"{job}|PENDING|Dependency")
        if phase == "pending":
            squeue.append(f"{train_job}_{i}|PENDING|Priority")
    (folder / "sacct.txt").write_text("\n".join(sacct) + "\n")
    (folder / "squeue.txt").write_text("\n".join(squeue) + "\n")
    return {
        "FAKE_SLURM_SACCT": str(folder / "sacct.txt"),
        "FAKE_SLURM_SQUEUE": str(folder / "squeue.txt"),
    }


# Each ablation runs the launcher with one speed layer taken out (patched before launch.py runs),
# on a first look at the sweep's files (file_facts.json removed before each sample) as well as
# on a repeated one.
ABLATIONS = {
    "no file facts": (
        "import hpc.file_facts as F; _init = F.FileFacts.__init__\n"
        "def init(self, d, **kw):\n    _init(self, d, **kw); self.kept = {}\n"
        "F.FileFacts.__init__ = init; F.FileFacts.save = lambda self: None"
    ),
    "zipfile reader": (
        "import zipfile, hpc.file_facts as F\n"
        "def whole(p):\n    try:\n        with zipfile.ZipFile(p) as z:\n"
        "            return any(n.endswith('data.pkl') for n in z.namelist())\n"
        "    except (OSError, zipfile.BadZipFile):\n        return False\n"
        "F.looks_complete = whole"
    ),
}


def _launch(args: list[str], prelude: str = "") -> list[str]:
    code = f"{prelude}\nimport runpy, sys\nsys.argv = ['launch.py', *{args!r}]\n"
    return [sys.executable, "-c", code + "runpy.run_path('launch.py', run_name='__main__')"]


def _datasets(root: Path) -> None:
    """CIFAR-10, CIFAR-100 and SVHN files of their real sizes in torchvision's formats (zero
    pixels): what a launch checks under data.root."""
    import numpy as np
    import scipy.io

    def batch(path: Path, n: int, labels: str) -> None:
        data = {"data": np.zeros((n, 3072), np.uint8), labels: [0] * n, "batch_label": path.name}
        if labels == "fine_labels":
            data["coarse_labels"] = [0] * n
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=2)

    c10, c100 = root / "cifar-10-batches-py", root / "cifar-100-python"
    c10.mkdir(parents=True)
    c100.mkdir()
    for i in range(1, 6):
        batch(c10 / f"data_batch_{i}", 10_000, "labels")
    batch(c10 / "test_batch", 10_000, "labels")
    batch(c10 / "batches.meta", 0, "label_names")
    batch(c100 / "train", 50_000, "fine_labels")
    batch(c100 / "test", 10_000, "fine_labels")
    batch(c100 / "meta", 0, "fine_label_names")
    for split, n in (("train", 73_257), ("test", 26_032)):
        x = np.zeros((32, 32, 3, n), np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": np.ones((n, 1), np.uint8)})


def _rows(timed: dict[str, float], n: int) -> list[dict[str, Any]]:
    return [
        {"step": name, "seconds": round(s, 3), "us_per_run": round(s / n * 1e6, 1)}
        for name, s in timed.items()
    ]


def _in_process(overrides: list[str]) -> tuple[list[dict[str, Any]], int, Any]:
    """Each planning step in this process, once; (rows, runs, the arrays)."""
    cfg, t_compose = _timed(lambda: compose_config(overrides))
    check_launch(cfg)
    runs, t_expand = _timed(lambda: expand(cfg))
    plan, t_plan = _timed(lambda: make_plan(cfg, runs, query_slurm=False))
    specs, t_arrays = _timed(lambda: arrays_for(cfg, plan))
    with contextlib.redirect_stdout(io.StringIO()):
        _, t_render = _timed(lambda: print_arrays(cfg, specs, scripts=True))
    steps = {
        "compose config": t_compose,
        "expand grid (run ids)": t_expand,
        "plan (disk + ledger)": t_plan,
        "build arrays": t_arrays,
        "render sbatch scripts": t_render,
    }
    thesis = sum(1 + len(st.roles) for st in plan.states)
    without = sum(steps.values())
    # What the code snapshot adds to a launch (hpc.snapshot): reading and hashing the code
    # (every launch and dry run), writing it (a launch with new code), checking a stored one
    # (a relaunch with unchanged code).
    code, t_read = _timed(snapshot.read)
    _, t_write = _timed(lambda: code.write(sweep_dir(cfg)))
    _, t_reuse = _timed(lambda: code.write(sweep_dir(cfg)))
    steps |= {
        "code snapshot: read + hash": t_read,
        "code snapshot: write (new code)": t_write,
        "code snapshot: check stored (same code)": t_reuse,
    }
    SNAPSHOT.update(
        bytes=code.size,
        files=len(code.files),
        launch_without_s=round(without, 3),
        added_new_code_s=round(t_read + t_write, 4),
        added_same_code_s=round(t_read + t_reuse, 4),
        ratio_new_code=round((t_read + t_write) / without, 4),
        ratio_same_code=round((t_read + t_reuse) / without, 4),
    )
    return _rows(steps, len(runs)), len(runs), (cfg, runs, specs, thesis, without)


def run(args: argparse.Namespace) -> dict[str, Any]:
    # The command line as a user runs it: bytecode compiled (as pip leaves an installed
    # package; this project is installed editable, so its .pyc files are written on first
    # import, unless PYTHONDONTWRITEBYTECODE is set, as on the project's VMs).
    compileall.compile_dir(str(REPO / "hpc"), quiet=1)
    compileall.compile_dir(str(REPO / "dhm"), quiet=1)
    repeats = max(1, args.repeats)
    hydra = [sys.executable, "-c", "import hydra, omegaconf"]
    small = ["cluster.partition=debug", "cluster.cpus_per_task=1", "cluster.eval_cpus=1"]
    with tempfile.TemporaryDirectory() as tmp:
        root, fakes = Path(tmp) / "root", Path(tmp) / "fake-slurm"
        fakes.mkdir()
        overrides = ["cluster=slurm", f"root={root}", *_grid(args.runs)]
        rows, n, (cfg, runs, specs, thesis, dry_total) = _in_process(overrides)
        env = _fake_slurm(fakes)
        launch = _launch([*overrides, *small, "mode=dry_run"])
        status = _launch(["sweep.name=bench", f"root={root}", "mode=status"])
        write_plan(cfg, runs)  # the launch a status reads (a dry run stores no plan)
        fresh = _interleaved(
            {"ref": (hydra, env, None), "dry": (launch, env, None), "status": (status, env, None)},
            repeats,
        )
        env_flight = {**env, **_populate(cfg, runs, fakes)}
        facts = sweep_dir(cfg) / "file_facts.json"
        forget = lambda: facts.unlink(missing_ok=True)  # noqa: E731
        cases = {"ref": (hydra, env_flight, None)}
        for name, prelude in {"": "", **ABLATIONS}.items():
            tag = f", {name}" if name else ""
            for first in (True, False):  # a repeated look after its first look
                look = " (first look)" if first else ""
                cases[f"status{tag}{look}"] = (
                    _launch(["sweep.name=bench", f"root={root}", "mode=status"], prelude),
                    env_flight,
                    forget if first else None,
                )
                cases[f"relaunch{tag}{look}"] = (
                    _launch([*overrides, *small, "mode=dry_run"], prelude),
                    env_flight,
                    forget if first else None,
                )
        flight = _interleaved(cases, repeats)
        study = {}
        if not args.quick:
            data, root2 = Path(tmp) / "data", Path(tmp) / "study"
            _datasets(data)
            axes = ",".join(map(str, range(100)))
            grid = ["sweep=alpha_beta", f"+sweep.axes={{train.seed:[{axes}]}}", "cluster=slurm",
                    f"root={root2}", f"data.root={data}", *small]  # fmt: skip
            with contextlib.redirect_stdout(io.StringIO()):
                write_plan(*(lambda c: (c, expand(c)))(compose_config(grid)))
            study = _interleaved(
                {
                    "ref": (hydra, env, None),
                    "dry": (_launch([*grid, "mode=dry_run"]), env, None),
                    "status": (
                        _launch(["sweep.name=alpha_beta", f"root={root2}", "mode=status"]),
                        env,
                        None,
                    ),
                },
                repeats,
            )
    timed = {
        "python -c 'import hydra, omegaconf' (reference)": fresh["ref"],
        "python launch.py ... mode=dry_run": fresh["dry"],
        "python launch.py sweep.name=bench mode=status, stored plan": fresh["status"],
        "python -c 'import hydra, omegaconf' (reference, in flight phase)": flight["ref"],
        **{f"... in flight: {k}": v for k, v in flight.items() if k != "ref"},
    }
    if study:
        timed |= {
            "python -c 'import hydra, omegaconf' (reference, study phase)": study["ref"],
            "alpha_beta x 100 seeds (1,002 runs), dataset files: mode=dry_run": study["dry"],
            "alpha_beta x 100 seeds: mode=status, stored plan": study["status"],
        }
    rows += _rows(timed, n)
    under = {
        "dry_run_s": round(fresh["dry"], 3),
        "status_s": round(fresh["status"], 3),
        "status_in_flight_s": round(flight["status"], 3),
        "status_in_flight_first_look_s": round(flight["status (first look)"], 3),
        "relaunch_dry_run_in_flight_s": round(flight["relaunch"], 3),
        "relaunch_dry_run_in_flight_first_look_s": round(flight["relaunch (first look)"], 3),
    }
    if study:
        under |= {"study_dry_run_s": round(study["dry"], 3),
                  "study_status_s": round(study["status"], 3)}  # fmt: skip
    layers = {
        name: {
            f"{cmd}_s{'_first_look' if look else ''}": {
                "with": round(flight[f"{cmd}{look}"], 3),
                "without": round(flight[f"{cmd}, {name}{look}"], 3),
            }
            for cmd in ("status", "relaunch")
            for look in ("", " (first look)")
        }
        for name in ABLATIONS
    }
    return {
        "rows": rows,
        "summary": {
            "runs": n,
            "dry_run_total_s_in_process": round(dry_total, 3),
            "sbatch_calls_ours": len(specs),
            "tasks_per_stage": {s.stage: len(s.tasks) for s in specs},
            "sbatch_calls_one_script_per_run_and_stage": thesis,
            "import_hydra_s": round(fresh["ref"], 3),
            **under,
            "speed_layers": layers,
            "code_snapshot": dict(SNAPSHOT),
            "target": "each command under 1 s on a 2-core machine",
            "meets_target": all(v < 1.0 for v in under.values()),
        },
    }
