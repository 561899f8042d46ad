"""Evaluation variants side by side (dhm.core.variants, hpc.evaluate), through launch.py's
command line in this process (cluster=local) and on the local Slurm cluster.

One small sweep is trained once per module; each test evaluates a copy of it again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dhm.core import variants as V
from dhm.core.config import from_yaml
from dhm.evaluation import results
from dhm.evaluation.evaluate import evaluate_all
from dhm.model import checkpoint as model_ckpt
from dhm.summary import metrics as M
from hpc import stages
from hpc.cli import cli
from tests.helpers.sweeps import VARIANT_SWEEP
from tests.test_slurm_e2e import PROFILE, TINY, _cluster_env, ledger, wait_for_jobs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A two-run sweep (a DHM and a ResNet), trained 2 epochs keeping epoch 1, evaluated."""
    root = tmp_path_factory.mktemp("variants")
    assert cli([f"root={root}", *VARIANT_SWEEP]) == 0
    return root


@pytest.fixture
def sweep(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(root, sweep folder) of a copy of the trained sweep, for one test to change."""
    # plan.json names the root it was launched under: a copy acts on its own runs anyway
    # (every test here would otherwise write into the module's sweep, and fail)
    shutil.copytree(trained, tmp_path / "root", symlinks=True)
    return tmp_path / "root", tmp_path / "root" / "var"


def evaluate(root: Path, *args: str) -> int:
    return cli([f"root={root}", "sweep.name=var", "mode=evaluate", *args])


def hashes(sweep: Path) -> dict[str, str]:
    return {
        str(p.relative_to(sweep)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((sweep / "runs").rglob("eval/**/*.h5"))
    }


def rows(sweep: Path) -> list[dict]:
    with open(sweep / "summary" / "results.csv") as f:
        return list(csv.DictReader(f))


def count_eval_calls(monkeypatch) -> list[tuple]:
    """Every eval task this process runs: (set, checkpoint, parts, runs)."""
    calls, real = [], stages.EvalStage.__call__

    def counted(self, yamls, set_name, role, run_id=None, checkpoint="final", parts=None):
        calls.append((set_name, str(checkpoint), tuple(parts or ()),
                      1 if isinstance(yamls, str) else len(yamls)))  # fmt: skip
        return real(self, yamls, set_name, role, run_id, checkpoint, parts)

    monkeypatch.setattr(stages.EvalStage, "__call__", counted)
    return calls


def test_an_attack_only_variant_computes_only_test_set_attacks_and_disturbs_nothing(
    sweep, monkeypatch, capsys
):
    root, folder = sweep
    before = hashes(folder)
    calls = count_eval_calls(monkeypatch)
    assert evaluate(root, "eval.variant=pgd3", "eval.pgd_steps=3") == 0
    out = capsys.readouterr().out
    # Only the test set's attacks, one task per run with a classifier (both runs here).
    assert calls == [("digits", "final", ("attacks",), 1)] * 2
    after = hashes(folder)
    new = sorted(set(after) - set(before))
    assert len(new) == 2 and all("/eval/final-attacks-" in p and "digits__" in p for p in new)
    assert {p: after[p] for p in before} == before  # every file of the first: same path, bytes
    assert "reuse scores (final-scores-" in out and out.count("compute attacks") == 2
    # Both variants in the summary: a row per run and variant, the setting as a column.
    table = rows(folder)
    assert sorted((r["variant"], r["eval.pgd_steps"]) for r in table) == [
        ("default", "1"), ("default", "1"), ("pgd3", "3"), ("pgd3", "3")]  # fmt: skip
    for rid in {r["run_id"] for r in table}:
        a, b = (next(r for r in table if r["run_id"] == rid and r["variant"] == v)
                for v in ("default", "pgd3"))  # fmt: skip
        assert a["accuracy"] == b["accuracy"] and a["ece"] == b["ece"]  # shared scores
        assert a["fgsm_acc_eps0.05"] == b["fgsm_acc_eps0.05"]  # FGSM does not use pgd_steps
        assert float(b["pgd_acc_eps0.05"]) <= float(b["fgsm_acc_eps0.05"])  # PGD starts at FGSM
    cells = list(csv.DictReader(open(folder / "summary" / "cells.csv")))
    assert sorted(c["variant"] for c in cells) == ["default", "default", "pgd3", "pgd3"]
    # Again: nothing to do, nothing submitted; status says both are done for every run.
    calls.clear()
    assert evaluate(root, "eval.variant=pgd3") == 0
    assert calls == []
    assert cli([f"root={root}", "sweep.name=var", "mode=status"]) == 0
    out = capsys.readouterr().out
    assert "variant default (" in out and ": 2 done" in out and "pgd3:done" in out


def test_checkpoints_by_epoch_give_a_row_each_equal_to_evaluating_by_hand(sweep, tmp_path, capsys):
    root, folder = sweep
    assert evaluate(root, "eval.checkpoints=[1,final]") == 0
    out = capsys.readouterr().out
    assert "evaluation: variant checkpoints=1+final (" in out
    # final is the default's: reused; epoch 1 is computed
    assert "eval digits@epoch1/checkpoints=1+final: now (trained): compute scores" in out
    table = [r for r in rows(folder) if r["variant"] == "checkpoints=1+final"]
    assert sorted(r["checkpoint"] for r in table) == ["1", "1", "final", "final"]
    for row in table:
        run_dir = folder / "runs" / row["run_id"]
        name = "final.pt" if row["checkpoint"] == "final" else "epoch_0001.pt"
        state = model_ckpt.load(run_dir / "checkpoints" / name)
        cfg = from_yaml(state["config_yaml"])
        cfg.run_dir = str(tmp_path / f"hand-{row['run_id']}-{row['checkpoint']}")
        cfg.data.root = str(REPO / "data")
        evaluate_all(cfg, run_dir / "checkpoints" / name)
        digits = results.load_run(Path(cfg.run_dir) / "eval")["digits"].arrays
        logits, labels = digits["logits"].astype(np.float64), digits["labels"]
        accuracy = float((logits.argmax(1) == labels).mean())  # by hand
        assert float(row["accuracy"]) == pytest.approx(accuracy, abs=1e-12)
        assert float(row["ece"]) == pytest.approx(M.expected_calibration_error(logits, labels))
        assert float(row["fgsm_acc_eps0.05"]) == pytest.approx(
            float((digits["fgsm/pred"][1] == labels).mean()), abs=1e-12
        )
        if "neg_elbo" in digits:
            assert float(row["neg_elbo_nats"]) == pytest.approx(float(digits["neg_elbo"].mean()))
    # The two checkpoints are different models: epoch 1's figures are not final's.
    for rid in {r["run_id"] for r in table}:
        mine = {r["checkpoint"]: r for r in table if r["run_id"] == rid}
        assert mine["1"]["nll"] != mine["final"]["nll"]
    assert (folder / "runs" / table[0]["run_id"] / "checkpoints" / "epoch_0001.pt").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["eval.variant=nope"], ["eval.variant=nope is not a variant", "default ("]),
        (["eval.checkpoints=[2,final]"], ["eval.checkpoints=[2,final] is not allowed",
                                          "did not keep epoch 2", "train.keep_epochs=[1]"]),
        (["train.lr=0.1", "eval.pgd_steps=3"], ["mode=evaluate: train.lr=0.1 is not allowed",
                                                "training setting"]),
        (["model.beta=2", "eval.pgd_steps=3"], ["model.beta=2 is not allowed"]),
    ],
)  # fmt: skip
def test_bad_evaluations_exit_2_naming_the_key_and_what_exists(sweep, capsys, args, words):
    root, folder = sweep
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.name != ".lock"}
    assert evaluate(root, *args) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.name != ".lock"} == before


def test_a_name_taken_by_other_settings_is_refused(sweep, capsys):
    root, _ = sweep
    assert evaluate(root, "eval.variant=pgd3", "eval.pgd_steps=3") == 0
    capsys.readouterr()
    assert evaluate(root, "eval.variant=pgd3", "eval.pgd_steps=4") == 2
    assert (
        "the sweep's variant pgd3 has other settings (pgd_steps=3 there)" in capsys.readouterr().err
    )


def test_shards_of_the_layout_before_variants_are_read_as_the_default(sweep, capsys):
    """A sweep evaluated before variants (one file per shard, both parts in it, in eval/) is
    planned as done and aggregated to the same figures: nothing is evaluated again."""
    root, folder = sweep
    (folder / "variants.json").unlink()
    first = rows(folder)
    settings = V.read_registry(folder)[0].settings  # the plan's eval settings, as default
    for run_dir in (folder / "runs").iterdir():
        sets = results.load_run(run_dir / "eval")
        for name, merged in sets.items():
            arrays = dict(merged.arrays)
            attrs = {**merged.attrs, "eval_id": V.legacy_eval_id(settings), "start": 0,
                     "stop": len(arrays["indices"])}  # fmt: skip
            attrs.pop("schema_version", None)
            attrs.pop("set", None)
            results.write_shard(run_dir / "eval" / results.shard_name(name, 0, attrs["stop"]),
                                name, arrays, attrs)  # fmt: skip
        for part in (run_dir / "eval").iterdir():
            if part.is_dir():
                shutil.rmtree(part)
    (folder / "summary" / "manifest.json").unlink()
    assert cli([f"root={root}", *VARIANT_SWEEP]) == 0
    out = capsys.readouterr().out
    assert out.count("reuse its shards of the layout before variants") == 2 * 3  # 2 runs x 3 sets
    assert "compute" not in out
    assert not [p for p in (folder / "runs").rglob("eval/*") if p.is_dir()]
    again = rows(folder)
    keys = ["accuracy", "ece", "neg_elbo_nats", "fgsm_acc_eps0.05", "pgd_acc_eps0.05"]
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in first]


def test_evaluate_waits_for_the_sweeps_lock(sweep, capsys):
    root, folder = sweep
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hpc import lock\n"
         f"with lock.held({str(folder)!r}, 'a test', 0):\n"
         "    print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert evaluate(root, "eval.pgd_steps=3", "lock_wait_s=0") == 1
        assert "a test" in capsys.readouterr().err
        assert (
            json.loads((folder / "variants.json").read_text())["variants"][-1]["name"] == "default"
        )
    finally:
        holder.kill()


@pytest.mark.slurm
def test_on_the_cluster_a_second_variant_submits_only_attack_tasks(tmp_path):
    env = _cluster_env()
    args = [f"root={tmp_path}", *PROFILE, *TINY, "sweep=single", "sweep.name=var2",
            "sweep.points=[{model.beta:1.0},{model.beta:2.0}]"]  # fmt: skip

    def launch(*extra: str) -> list[dict]:
        out = subprocess.run([sys.executable, "launch.py", *extra], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        known = {(j["job_id"]) for j in submitted}
        new = [j for j in ledger(folder) if j["job_id"] not in known]
        assert new, out.stdout[-3000:]  # submitted to the cluster, not run here
        submitted.extend(new)
        states = wait_for_jobs(env, [j["job_id"] for j in new])
        assert set(states.values()) == {"COMPLETED"}, states
        return new

    folder, submitted = tmp_path / "var2", []
    first = launch(*args)
    assert {j["stage"].split(":")[0] for j in first} == {"train", "eval", "aggregate"}
    before = hashes(folder)
    # As the issue writes it: no cluster= (the sweep's stored profile), no training settings.
    second = launch(f"root={tmp_path}", "sweep.name=var2", "mode=evaluate", "eval.variant=pgd3",
                    "eval.pgd_steps=3")  # fmt: skip
    evals = [j for j in second if j["stage"].startswith("eval")]
    assert [j["stage"] for j in evals] == ["eval:digits"]  # one array: the test set's attacks
    assert [t["set"] for j in evals for t in j["tasks"]] == ["digits/pgd3", "digits/pgd3"]
    assert {j["stage"] for j in second} == {"eval:digits", "aggregate"}
    after = hashes(folder)
    assert {p: after[p] for p in before} == before
    assert (
        sorted(set(after) - set(before))
        == sorted(p for p in after if "/eval/final-attacks-" in p and p not in before)
        and len(set(after) - set(before)) == 2
    )
    table = rows(folder)
    assert sorted(r["variant"] for r in table) == ["default", "default", "pgd3", "pgd3"]
    assert all(r["status"] == "ok" for r in table)
