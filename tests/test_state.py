"""One view of a sweep's state: status's rows and footer, the summary's problem column, its
manifest and the report agree (hpc.state.describe), through the command line on a sweep whose
shards are written as the stages leave them."""

from __future__ import annotations

import json

import pytest

from dhm.core.layout import summary_complete
from hpc.cli import cli, compose_config
from hpc.state import run_reports
from hpc.sweep import expand, stored_sweep, sweep_dir, write_plan
from tests.helpers.sweeps import make_arrays, write_run, write_trained

N = 80  # images per set (eval.max_images): what the synthetic shards hold


@pytest.fixture
def cancelled(tmp_path):
    """The demo sweep trained and evaluated on its own sets, every OOD evaluation missing (a
    mode=cancel before the OOD eval tasks ran)."""
    cfg = compose_config(["sweep=demo", "cluster=local", f"root={tmp_path}",
                          f"eval.max_images={N}"])  # fmt: skip
    runs = expand(cfg)
    write_plan(cfg, runs)
    for i, run in enumerate(runs):
        m = run.cfg.model
        sets = make_arrays(i, m.name, n_id=N, n_val=N)
        sets.pop("digits_ood")
        write_run(sweep_dir(cfg), run.run_id, m.name, m.alpha, m.beta, i, sets=sets)
        write_trained(sweep_dir(cfg) / "runs" / run.run_id)
    return cfg, runs


def _status(cfg, capsys) -> list[str]:
    assert cli(["sweep.name=demo", f"root={cfg.root}", "mode=status"]) == 0
    return capsys.readouterr().out.splitlines()


def test_missing_evaluations_show_the_same_everywhere(cancelled, capsys):
    cfg, runs = cancelled
    n = len(runs)
    lines = _status(cfg, capsys)
    rows = [ln for ln in lines if ln.split(" ", 1)[0] in {r.run_id for r in runs}]
    assert len(rows) == n
    for row in rows:  # trained, its own sets done, its OOD sets missing
        assert " eval " in row and "digits_heldout" in row and "not submitted" in row
    footer = next(ln for ln in lines if ln.startswith(f"{n} runs:"))
    assert footer.startswith(f"{n} runs: {n} eval missing; no summary")

    reasons, states = run_reports(cfg)
    assert set(reasons) == {r.run_id for r in runs}
    assert {s["bucket"] for s in states.values()} == {"eval missing"}

    # The aggregation refuses: every run lacks the sets its own config evaluates.
    assert cli(["sweep.name=demo", f"root={cfg.root}", "mode=aggregate"]) == 1
    err = capsys.readouterr().err
    assert f"{n} of {n} runs are incomplete" in err and "digits_heldout" in err
    done, why = summary_complete(sweep_dir(cfg))
    assert why == f"summary partial (0 of {n} runs ok)"  # the manifest never says complete
    manifest = json.loads((sweep_dir(cfg) / "summary" / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["ok"] == 0

    # Accepted as partial: every row marked, none counted ok.
    args = ["sweep.name=demo", f"root={cfg.root}", "mode=aggregate", "allow_partial=true"]
    assert cli(args) == 0
    capsys.readouterr()
    table = (sweep_dir(cfg) / "summary" / "results.csv").read_text().splitlines()
    header = table[0].split(",")
    status_col = header.index("status")
    assert {row.split(",")[status_col] for row in table[1:]} == {"missing"}
    md = (sweep_dir(cfg) / "summary" / "results.md").read_text()
    assert f"({n} runs, 0 ok)" in md and "digits_heldout" in md.split("## Problems")[1]
    footer = next(ln for ln in _status(cfg, capsys) if ln.startswith(f"{n} runs:"))
    assert f"{n} eval missing; summary partial (0 of {n} runs ok)" in footer
    page = (sweep_dir(cfg) / "summary" / "report.html").read_text()
    assert "digits_heldout" in page  # the report names the missing set as status does


def test_a_failed_local_training_is_failed_not_unstarted(cancelled, capsys):
    cfg, runs = cancelled
    run = runs[0]
    run_dir = sweep_dir(cfg) / "runs" / run.run_id
    (run_dir / "checkpoints" / "final.pt").unlink()
    record = {"outcome": "failed", "exception": "NonFiniteLossError: loss is nan at step 3"}
    (run_dir / "logs" / "train_attempts.jsonl").write_text(json.dumps(record) + "\n")
    lines = _status(cfg, capsys)
    row = next(ln for ln in lines if ln.startswith(run.run_id))
    assert "train failed" in row and "NonFiniteLossError" in row
    footer = next(ln for ln in lines if ln.startswith(f"{len(runs)} runs:"))
    assert footer.startswith(f"{len(runs)} runs: 1 failed, {len(runs) - 1} eval missing;")
    reasons, states = run_reports(cfg)
    assert "NonFiniteLossError" in reasons[run.run_id]
    assert states[run.run_id]["bucket"] == "failed"


def test_a_run_is_judged_by_the_sets_its_latest_launch_evaluates(tmp_path):
    # Trained and evaluated against digits_ood; relaunched with a second OOD set (the plan's
    # config names both): until that set is evaluated, the run is incomplete.
    from dhm.summary.aggregate import aggregate

    ood = "eval.ood_sets=[digits_heldout,digits_ood]"
    cfg = compose_config(["sweep=demo", "cluster=local", f"root={tmp_path}",
                          f"eval.max_images={N}", ood])  # fmt: skip
    runs = expand(cfg)
    write_plan(cfg, runs)
    for i, run in enumerate(runs):
        m = run.cfg.model
        sets = make_arrays(i, m.name, n_id=N, n_val=N, n_ood=N)  # config: ood_sets=[digits_ood]
        write_run(sweep_dir(cfg), run.run_id, m.name, m.alpha, m.beta, i, sets=sets)
    report = aggregate(sweep_dir(cfg), allow_partial=True, plots=False)
    assert {row["status"] for row in report.rows} == {"missing"}
    assert all("digits_heldout" in reason for _, reason in report.problems)


def test_a_stored_sweep_keeps_its_cluster_profile_with_the_command_lines_keys(tmp_path):
    # mode=evaluate, aggregate, status and cancel act where the sweep was launched: the stored
    # profile, with cluster.<key> values of the command line on top; cluster= names another.
    launched = ["sweep=demo", "cluster=slurm", "cluster.partition=debug", f"root={tmp_path}"]
    write_plan(compose_config(launched), expand(compose_config(launched)))
    base = ["sweep.name=demo", f"root={tmp_path}", "mode=evaluate"]
    cfg = stored_sweep(compose_config(base), base)[0]
    assert (cfg.cluster.kind, cfg.cluster.partition) == ("slurm", "debug")
    again = [*base, "cluster.eval_time=90"]
    cfg = stored_sweep(compose_config(again), again)[0]
    assert (cfg.cluster.kind, cfg.cluster.partition, cfg.cluster.eval_time) == (
        "slurm",
        "debug",
        "90",
    )
    here = [*base, "cluster=local"]
    assert stored_sweep(compose_config(here), here)[0].cluster.kind == "local"
