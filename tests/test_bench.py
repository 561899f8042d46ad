"""The benchmarks run end to end through ``python -m bench.run``'s entry point, at toy sizes.

Nothing here asserts a speed (the machines are shared and noisy): these tests keep every
benchmark runnable and check what its report counts (runs, sbatch calls, FLOPs, the table
columns), so a refactor elsewhere cannot silently break ``make bench``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench import run as bench_run
from bench.flops import train_flops_per_image

TINY = [
    "--device", "cpu", "--quick", "--width", "4", "--latent-dim", "8", "--batch", "16",
    "--images", "96", "--runs", "20", "--repeats", "1", "--warmup", "0", "--steps", "1",
    "--iwae-k", "1,3", "--fgsm-eps", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "result.json"
    assert bench_run.main([*TINY, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_benchmark_reports(report):
    assert list(report["benchmarks"]) == list(bench_run.BENCHMARKS)
    assert report["machine"]["device_name"] and report["options"]["runs"] == 20
    for name, result in report["benchmarks"].items():
        assert result["rows"], name
        assert result["seconds"] > 0


def test_pipeline_and_train_step_report_ratios(report):
    pipe = report["benchmarks"]["pipeline"]
    assert _positive(pipe["summary"]["ratio ours/ref"])
    assert pipe["config"] == {"images": 96, "batch": 16, "workers": pipe["config"]["workers"]}
    step = report["benchmarks"]["train_step"]
    models = [r["model"] for r in step["rows"]]
    assert {"dhm-s0", "dhm-s4", "resnet", "vae"} <= set(models)
    assert all(_positive(r["ratio"]) and _positive(r["ours img/s"]) for r in step["rows"])


def test_eval_cost_counts_the_grid(report):
    ev = report["benchmarks"]["eval_cost"]
    assert ev["config"]["eps"][0] == 0 and len(ev["config"]["eps"]) == 3
    assert ev["config"]["iwae_k"] == [1, 3]
    assert ev["summary"]["FGSM bound 2+E"] == 5
    ops = [r["op"] for r in ev["rows"]]
    assert "FGSM grid, E=3" in ops and "ELBO/IWAE k=3" in ops


def test_flops_headline_is_the_width64_dhm(report):
    fl = report["benchmarks"]["flops"]
    # Three ResNet-18 trunks forward + backward: the "about 10 GFLOP".
    assert 9.0 < fl["headline_flops_per_image"] / 1e9 < 12.5
    assert all(0 < r["MFU"] for r in fl["rows"])


def test_flop_count_scales_with_width():
    # Convolution FLOPs grow with width^2 (the latent head and decoder input do not).
    small = train_flops_per_image("resnet", 0, 8, 8, bench_run.torch.device("cpu"))
    large = train_flops_per_image("resnet", 0, 16, 8, bench_run.torch.device("cpu"))
    assert 3.5 < large / small < 4.1


def test_packing_reports_the_throughput_of_runs_side_by_side(report):
    pack = report["benchmarks"]["packing"]
    assert [r["runs per task"] for r in pack["rows"]] == [1, 2]
    assert pack["rows"][0]["ratio vs 1 run"] == 1.0
    assert all(_positive(r["images/s (all runs)"]) for r in pack["rows"])


def test_launcher_counts_sbatch_calls(report):
    summary = report["benchmarks"]["launcher"]["summary"]
    assert summary["runs"] == 20
    # One train array, one eval array per set (test, validation, 2 OOD sets), one aggregate ...
    assert summary["sbatch_calls_ours"] == 6
    assert summary["tasks_per_stage"] == {
        "train": 20, "eval:digits": 20, "eval:digits-val": 20, "eval:digits_heldout": 20,
        "eval:digits_ood": 20, "aggregate": 1,
    }  # fmt: skip
    # ... against one script per run for training and per run and set for evaluation.
    assert summary["sbatch_calls_one_script_per_run_and_stage"] == 100
    # The command line ran (dry run and status through launch.py, in flight too), and each
    # speed layer was measured by taking it out.
    for key in ("dry_run_s", "status_s", "status_in_flight_s", "relaunch_dry_run_in_flight_s"):
        assert _positive(summary[key])
    assert set(summary["speed_layers"]) == {"no file facts", "zipfile reader"}
    for layer in summary["speed_layers"].values():
        assert set(layer) == {"status_s", "status_s_first_look", "relaunch_s",
                              "relaunch_s_first_look"}  # fmt: skip
        for pair in layer.values():
            assert _positive(pair["with"]) and _positive(pair["without"])


def test_aggregate_reads_every_run(report):
    agg = report["benchmarks"]["aggregate"]
    assert agg["summary"]["runs"] == 20
    assert _positive(agg["summary"]["ratio_aggregate_over_h5py_read"])
    assert _positive(agg["summary"]["ratio_report_over_aggregate"])


def test_bad_options_exit_2_naming_the_option(capsys):
    with pytest.raises(SystemExit) as err:
        bench_run.parse_args(["--only", "pipeline,nope"])
    assert err.value.code == 2
    assert "--only: unknown nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--runs", "0"])
    assert "--runs must be positive" in capsys.readouterr().err


def test_gpu_benchmarks_import_without_hydra_or_submitit():
    # A GPU box may have torch, omegaconf and h5py but not the launcher's packages.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('hydra', 'submitit'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from bench import run\n"
        "for name in ('pipeline', 'train_step', 'eval_cost', 'flops', 'packing'):\n"
        "    run.benchmark(name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
