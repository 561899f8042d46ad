"""The architecture, held by tests: which package may import which, no import cycle, and a
launcher that never loads torch or matplotlib for status or a dry run."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCIENCE = ("dhm.model", "dhm.data", "dhm.training", "dhm.evaluation", "dhm.summary")
HEAVY = ("torch", "torchvision", "matplotlib", "accelerate", "pandas", "sklearn", "scipy")
# hpc modules that run the science: the stage callables (and the packed runs' child process)
SCIENCE_GATES = ("hpc.stages", "hpc.packed")


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("dhm", "hpc"):
        for path in sorted((REPO / top).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``path`` imports, at any depth: in functions and under TYPE_CHECKING too;
    ``from pkg import mod`` counts as importing ``pkg.mod`` when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(
                f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known
            )
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: {i for i in _imports(p, known) if i in known} for m, p in known.items()}


def test_the_core_is_torch_free_and_imports_no_other_part_of_dhm():
    known = _modules()
    for name, path in known.items():
        if not name.startswith("dhm.core"):
            continue
        imported = _imports(path, known)
        heavy = sorted(i for i in imported if i.split(".")[0] in HEAVY)
        assert not heavy, f"{name} imports {heavy}"
        other = sorted(i for i in imported if i.startswith(("dhm.", "hpc")) and
                       not i.startswith("dhm.core"))  # fmt: skip
        assert not other, f"{name} imports {other}"


def test_the_launcher_reaches_the_science_only_through_the_stages():
    known = _modules()
    for name, path in known.items():
        if not name.startswith("hpc") or name in SCIENCE_GATES:
            continue
        imported = _imports(path, known)
        science = sorted(i for i in imported if i.startswith(SCIENCE))
        assert not science, f"{name} imports {science}: go through hpc.stages"
        heavy = sorted(i for i in imported if i.split(".")[0] in HEAVY)
        assert not heavy, f"{name} imports {heavy}"


def test_the_science_never_imports_the_cluster():
    known = _modules()
    for name, path in known.items():
        if name.startswith("dhm"):
            bad = sorted(i for i in _imports(path, known) if i.split(".")[0] in ("hpc", "submitit"))
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycle_between_files():
    graph = _graph()
    # A package's __init__ is imported on the way to its modules: not an edge of its own here.
    edges = {m: {i for i in deps if i != m} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(edges[m]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_a_cycle_is_found_when_there_is_one(tmp_path, monkeypatch):
    # The detector itself: two modules importing each other inside functions.
    (tmp_path / "dhm" / "core").mkdir(parents=True)
    (tmp_path / "hpc").mkdir()
    (tmp_path / "dhm" / "core" / "a.py").write_text("def f():\n    from dhm.core import b\n")
    (tmp_path / "dhm" / "core" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import dhm.core.a\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"dhm.core.a -> dhm.core.b -> dhm.core.a"):
        test_no_import_cycle_between_files()


LOADED = """
import atexit, json, sys
atexit.register(lambda: print("LOADED=" + json.dumps(sorted(
    m for m in ("torch", "matplotlib", "h5py", "numpy", "submitit") if m in sys.modules))))
sys.argv = ["launch.py", *{args!r}]
import runpy
runpy.run_path("launch.py", run_name="__main__")
"""


def _loaded(args: list[str], env: dict[str, str]) -> tuple[set[str], str]:
    out = subprocess.run(
        [sys.executable, "-c", LOADED.format(args=args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("LOADED=")), None)
    assert line is not None and out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return set(json.loads(line[len("LOADED=") :])), out.stdout


def test_status_and_dry_run_of_a_sweep_in_flight_load_neither_torch_nor_matplotlib(tmp_path):
    """A sweep in flight with shards and a summary on disk, under cluster=slurm with sacct
    answering. Status loads neither torch, matplotlib nor h5py (its report renders from JSON);
    a dry run (a relaunch) loads h5py only to read the eval settings of shards it has not seen
    before. (A warm start, model.warm_start, would load torch: its checkpoint is loaded.)"""
    from dhm.summary.aggregate import aggregate
    from hpc.cli import compose_config
    from hpc.sweep import expand, sweep_dir, write_plan
    from tests.helpers.fake_slurm import install
    from tests.helpers.sweeps import make_arrays, write_run, write_trained

    n = 80  # images per set (eval.max_images): what the synthetic shards hold
    args = ["sweep=demo", "cluster=slurm", "cluster.partition=debug", "cluster.cpus_per_task=1",
            "cluster.eval_cpus=1", f"root={tmp_path}",
            f"eval.max_images={n}"]  # fmt: skip
    cfg = compose_config(args)
    runs = expand(cfg)
    write_plan(cfg, runs)
    for i, run in enumerate(runs[:-1]):  # the last one is still training: no folder
        m = run.cfg.model
        sets = make_arrays(i, m.name, n_id=n, n_val=n, n_ood=n)
        write_run(sweep_dir(cfg), run.run_id, m.name, m.alpha, m.beta, i, sets=sets)
        write_trained(sweep_dir(cfg) / "runs" / run.run_id)
    aggregate(sweep_dir(cfg), allow_partial=True, plots=False)
    assert (sweep_dir(cfg) / "summary" / "report_data.json").exists()

    (tmp_path / "bin").mkdir()
    env = {**os.environ, "PATH": f"{install(tmp_path / 'bin')}:{os.environ['PATH']}"}
    status, out = _loaded(["sweep.name=demo", f"root={tmp_path}", "mode=status"], env)
    assert f"{len(runs)} runs:" in out
    assert not status & {"torch", "matplotlib", "h5py", "numpy", "submitit"}, status
    dry, out = _loaded([*args, "mode=dry_run"], env)
    assert "sbatch call" in out
    assert not dry & {"torch", "matplotlib"}, dry
    assert "h5py" in dry  # shards never seen: their eval settings are read
    again, _ = _loaded([*args, "mode=dry_run"], env)
    assert not again & {"torch", "matplotlib", "h5py"}, again  # kept: no file opened
