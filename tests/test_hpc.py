"""The cluster side without a cluster: sweeps, run ids, Slurm env mapping, checks, plans."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from dhm.core import variants as V
from dhm.core.config import ConfigError, check_eval, run_config
from hpc import efficiency as E
from hpc import schema, slurm
from hpc.arrays import arrays_for
from hpc.cli import compose_config
from hpc.distributed import bind_device, expand_hostlist, master_port, torch_env_from_slurm
from hpc.launcher import print_arrays
from hpc.plan import make_plan
from hpc.slurm import Partition, _gpu_types
from hpc.stages import NoGPUError, require_cuda
from hpc.sweep import expand, grid_points, read_plan, run_id_of, write_plan


def _cfg(*overrides: str):
    """The launch config of these overrides, on sweep=single unless they name a sweep."""
    named = any(o.startswith("sweep=") for o in overrides)
    return compose_config([*([] if named else ["sweep=single"]), *overrides])


def test_every_shipped_sweep_and_cluster_profile_composes_and_expands(tmp_path):
    sizes = {"single": 1, "demo": 4, "alpha_beta": 12, "split_layer": 10, "iwae": 6}
    for name, n in sizes.items():
        cfg = _cfg(f"sweep={name}", f"root={tmp_path}")
        runs = expand(cfg)
        assert len(runs) == n, name
        assert len({r.run_id for r in runs}) == n
        assert all(r.run_dir.parent == tmp_path / name / "runs" for r in runs)
    for cluster in ("local", "slurm"):
        schema.check_launch(_cfg(f"cluster={cluster}"))


def test_alpha_beta_grid_is_the_thesis_study():
    runs = expand(_cfg("sweep=alpha_beta"))
    betas = sorted(r.cfg.model.beta for r in runs if r.cfg.model.name == "dhm")
    assert betas == [10.0**e for e in range(-4, 6)]
    kinds = {r.cfg.model.name: (r.cfg.model.alpha, r.cfg.model.beta) for r in runs}
    assert kinds["resnet"] == (1.0, 0.0) and kinds["vae"] == (0.0, 1.0)
    assert {r.cfg.data.name for r in runs} == {"cifar10"}


def test_run_id_is_stable_and_ignores_operational_settings():
    a = expand(_cfg("sweep=demo"))
    b = expand(
        _cfg("sweep=demo", "train.progress=false", "train.log_every_steps=1", "data.root=/x")
    )
    assert [r.run_id for r in a] == [r.run_id for r in b]
    c = expand(_cfg("sweep=demo", "train.seed=1"))
    assert not {r.run_id for r in a} & {r.run_id for r in c}
    assert run_id_of(a[0].cfg) == a[0].run_id


def test_seeds_repeat_every_point_without_spelling_out_an_axis():
    runs = expand(_cfg("sweep=demo", "sweep.seeds=3", "train.seed=10"))
    assert len(runs) == 4 * 3
    seeds = {}
    for r in runs:
        key = (r.cfg.model.name, r.cfg.model.beta)
        seeds.setdefault(key, []).append(r.cfg.train.seed)
        assert r.overrides["train.seed"] == r.cfg.train.seed  # a setting column of the summary
    assert all(v == [10, 11, 12] for v in seeds.values()) and len(seeds) == 4
    with pytest.raises(ConfigError, match="sweep.seeds=0"):
        schema.check_launch(_cfg("sweep.seeds=0"))


def test_axes_and_points_expand_to_a_product_plus_points():
    cfg = _cfg("+sweep.axes={model.beta:[1,2],model.kl_coeff:[0.1,1.0]}", "sweep.points=[]")
    points = grid_points(cfg.sweep)
    assert len(points) == 4 and {"model.beta": 2, "model.kl_coeff": 0.1} in points


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+sweep.axes={model.betta:[1]}"], "sweep.axes key 'model.betta' is not allowed"),
        (["+sweep.axes={eval.iwae_k:[[1]]}"], "a run is identified by its training config"),
        (["+sweep.axes={model.beta:[]}"], "must be a non-empty list"),
        (["+sweep.axes={model.vae_split_layer:[3,9]}"], "model.vae_split_layer=9"),
        (["cluster=slurm", "cluster.time=forever"], "cluster.time='forever' is not a Slurm time"),
        (["cluster=slurm", "cluster.partition='gpu;rm -rf /'"], "it goes into an sbatch line"),
        (["cluster=slurm", "cluster.gpus_per_node=4", "cluster.tasks_per_node=2"], "must equal"),
        (["cluster=slurm", "cluster.nodes=3", "train.batch_size=400"], "does not split over 3"),
        (["cluster=slurm", "+cluster.extra_sbatch={mail-user:'a b'}"], "extra_sbatch.mail-user"),
        (["cluster=slurm", "cluster.setup=['module load x\necho']"], "cluster.setup[0]"),
        (["cluster=slurm", "+cluster.env={NCCL_DEBUG:'a\nb'}"], "cluster.env.NCCL_DEBUG"),
        (["cluster=slurm", "cluster.gpu_bind=socket"], "cluster.gpu_bind='socket' is not allowed"),
    ],
)
def test_bad_launch_values_name_the_key(overrides, message):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        schema.check_launch(cfg)
        expand(cfg)


def test_fast_expansion_equals_the_schema_path_value_for_value(tmp_path):
    # expand() validates each distinct swept value once and copies plain data per run; each
    # run must equal the config OmegaConf builds point by point, and its YAML (what the stages
    # receive) must read back to the same config and run id.
    from omegaconf import OmegaConf

    from dhm.core.config import RunConfig, from_yaml
    from hpc.sweep import _updated

    cfg = _cfg(
        "+sweep.axes={model.beta:[1,0.5],train.lr:[1,2e-3],model.head_dropout:[[0,0.5]]}",
        "sweep.points=[{model.name:resnet,model.beta:0,data.ood_sets:[digits_ood]}]",
        f"root={tmp_path}",
    )
    runs = expand(cfg)
    assert len(runs) == 5
    base = OmegaConf.structured(RunConfig)
    for section in ("model", "data", "train", "eval"):
        base[section] = cfg[section]
    for run in runs:
        slow = _updated(base, run.overrides)
        slow["run_dir"] = run.cfg.run_dir
        assert run.cfg == OmegaConf.to_container(slow, resolve=True)
        assert type(run.cfg.model.beta) is float and type(run.cfg.train.lr) is float
        back = from_yaml(run.yaml)
        assert OmegaConf.to_container(back) == run.cfg.plain()
        assert run_id_of(back) == run.run_id


def test_sweep_values_with_interpolations_resolve_per_run(tmp_path):
    runs = expand(_cfg("+sweep.axes={model.alpha:[2,3]}", "sweep.points=[]",
                       "model.beta='${model.alpha}'"))  # fmt: skip
    assert sorted((r.cfg.model.alpha, r.cfg.model.beta) for r in runs) == [(2, 2), (3, 3)]
    # A path under the run's own folder: resolved once the run id (and run_dir) is known.
    runs = expand(_cfg("sweep=demo", f"root={tmp_path}", "data.root='${run_dir}/data'"))
    assert len(runs) == 4
    for run in runs:
        assert run.cfg.data.root == f"{tmp_path}/demo/runs/{run.run_id}/data"
        assert "${" not in run.yaml
    assert [r.run_id for r in runs] == [r.run_id for r in expand(_cfg("sweep=demo"))]


def test_strings_that_look_like_numbers_survive_the_yaml_round_trip():
    from omegaconf import OmegaConf

    from dhm.core.config import from_yaml

    for text in ["1e-3", "1e3", "-2E5", "inf", "nan", ".5", "1_000", "yes", "Off", "null", "~"]:
        run = expand(_cfg("sweep=single", f"model.warm_start='{text}'"))[0]
        back = from_yaml(run.yaml)
        assert back.model.warm_start == text, text
        assert OmegaConf.to_container(back) == run.cfg.plain()


def test_a_missing_sweep_value_is_refused():
    with pytest.raises(ConfigError, match="Missing mandatory value: model.name"):
        expand(_cfg("+sweep.axes={model.name:['???']}", "sweep.points=[]"))


def test_a_sweep_value_of_the_wrong_type_names_the_point():
    with pytest.raises(ConfigError, match=r"sweep point .*model.width.*abc"):
        expand(_cfg("+sweep.axes={model.width:[8,abc]}", "sweep.points=[]"))


def test_empty_grid_is_refused():
    with pytest.raises(ConfigError, match="empty grid"):
        expand(_cfg("sweep=single", "sweep.points=[]", "+sweep.axes={}", "sweep.name=none"))
    # The single sweep is one explicit point: the base config.
    assert len(expand(_cfg("sweep=single"))) == 1


@pytest.mark.parametrize(
    "text,minutes",
    [("90", 90), ("30:30", 31), ("04:00:00", 240), ("1-00", 1440), ("1-2:30", 1590),
     ("2-00:00:01", 2881)],
)  # fmt: skip
def test_time_limits_parse_like_slurm(text, minutes):
    assert schema.parse_time_minutes(text, "cluster.time") == minutes


def test_hostlists_and_torch_env():
    assert expand_hostlist("node[1-2]") == ["node1", "node2"]
    assert expand_hostlist("gpu[08-10,12],login") == ["gpu08", "gpu09", "gpu10", "gpu12", "login"]
    assert expand_hostlist("node[01-02]-ib,gpu5") == ["node01-ib", "node02-ib", "gpu5"]
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "777",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)"}  # fmt: skip
    assert torch_env_from_slurm(env) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node1", "MASTER_PORT": str(master_port(777)),
    }  # fmt: skip
    assert master_port(777) != master_port(778)


def test_each_binding_style_points_every_rank_at_its_own_physical_gpu():
    # What Slurm gives local task r of a node under each style (measured on the fake-GPU
    # cluster, slurm/README.md), and the device the science then asks for (Accelerate:
    # cuda:LOCAL_RANK): the GPU that CUDA_VISIBLE_DEVICES names at that index is task r's own.

    seen = {"node": ("0,1", "0,1"), "task": ("0", "1")}
    for style, visible in seen.items():
        physical = []
        for local, cvd in enumerate(visible):
            env = {"SLURM_PROCID": str(local), "SLURM_LOCALID": str(local)}
            got = bind_device(env, style)
            assert got["DHM_NODE_RANK"] == str(local) and got["DHM_GPU_BIND"] == style
            physical.append(cvd.split(",")[int(got["LOCAL_RANK"])])
        assert physical == ["0", "1"], style
    assert bind_device({}, "task") == {}  # outside a Slurm step: nothing to bind


def test_packed_runs_of_neighbouring_array_tasks_never_share_a_port():
    # The CI's 30-run sweep packed 2 runs a task: each child took the task's port + 1 + i, which
    # is the next task's own port, and 6 runs failed with EADDRINUSE. Every slot of every job id
    # in a window of 600 consecutive ids (an array's tasks on shared nodes) is distinct.
    from hpc.distributed import MAX_RUNS_PER_TASK, PORT_BASE, PORT_SLOTS, PORT_SPAN

    ports = [master_port(j, s) for j in range(5000, 5600) for s in range(PORT_SLOTS)]
    assert len(set(ports)) == len(ports)
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    with pytest.raises(ValueError, match="port slot 33"):
        master_port(1, MAX_RUNS_PER_TASK + 1)
    assert torch_env_from_slurm({}) == {}


def test_sacct_output_parses_arrays_ranges_and_requeued_attempts():
    from hpc.ledger import parse_sacct

    text = "\n".join(
        [
            "101_0|COMPLETED|0:0|12|node1|4000M|cpu=1,mem=4000M,node=1|None|t0|t1",
            "101_1|FAILED|1:0|3|node2||||",
            "101_[2-4%2]|PENDING|0:0|0|None assigned||||",
            "102|CANCELLED by 0|0:15|0|||||",
            "102.batch|CANCELLED|0:15|0|||||",
            # a requeued task: one record per attempt with -D, oldest first
            "103_5|NODE_FAIL|0:0|40|node2||||",
            "103_5|RUNNING|0:0|5|node1||||",
        ]
    )
    records = parse_sacct(text)
    assert records["101_0"][-1].state == "COMPLETED" and records["101_0"][-1].elapsed_s == 12
    assert records["101_0"][-1].alloc_tres == "cpu=1,mem=4000M,node=1"
    assert records["101_1"][-1].exit_code == "1:0" and records["101_3"][-1].state == "PENDING"
    assert records["102"][-1].state == "CANCELLED" and "102.batch" not in records
    assert [r.state for r in records["103_5"]] == ["NODE_FAIL", "RUNNING"]
    # Tasks split off before the rest of the array was cancelled keep their own state.
    split = parse_sacct("107_0|COMPLETED\n107_[0-1%2]|CANCELLED\n")
    assert {k: v[-1].state for k, v in split.items()} == {
        "107_0": "COMPLETED",
        "107_1": "CANCELLED",
    }


def _stages(specs):
    return [s.stage for s in specs]


def test_sbatch_calls_do_not_grow_with_the_grid(tmp_path):
    cfg = _cfg(
        "cluster=slurm",
        f"root={tmp_path}",
        "+sweep.axes={train.seed:[0,1,2,3,4,5,6,7]}",
        "sweep.name=big",
        "sweep.points=[]",
    )
    specs = arrays_for(cfg, make_plan(cfg, expand(cfg), query_slurm=False))
    small = _cfg(
        "cluster=slurm",
        f"root={tmp_path}",
        "+sweep.axes={train.seed:[0]}",
        "sweep.name=one",
        "sweep.points=[]",
    )
    small_specs = arrays_for(small, make_plan(small, expand(small), query_slurm=False))
    assert (
        _stages(specs)
        == _stages(small_specs)
        == [
            "train",
            "eval:digits",
            "eval:digits-val",
            "eval:digits_heldout",
            "eval:digits_ood",
            "aggregate",
        ]
    )
    assert len(specs[0].tasks) == 8 and len(specs[1].tasks) == 8
    assert specs[1].depends_on == 0 and specs[1].dependency_kind == "aftercorr"
    assert specs[-1].dependency_kind == "afterany"


def test_arrays_split_at_the_array_size_limit_each_eval_chunk_after_its_train_chunk(tmp_path):
    cfg = _cfg(
        "cluster=slurm",
        f"root={tmp_path}",
        "sweep.points=[]",
        "cluster.max_array_size=3",
        "+sweep.axes={train.seed:[0,1,2,3,4,5,6]}",
        "eval.ood_sets=[digits_ood]",
    )
    specs = arrays_for(cfg, make_plan(cfg, expand(cfg), query_slurm=False))
    trains = [i for i, s in enumerate(specs) if s.stage == "train"]
    assert [len(specs[i].tasks) for i in trains] == [3, 3, 1]  # 7 runs, at most 3 per array
    for i in trains:
        evals = [s for s in specs if s.depends_on == i]
        assert sorted(s.stage for s in evals) == [
            "eval:digits",
            "eval:digits-val",
            "eval:digits_ood",
        ]
        for ev in evals:  # task j of the eval chunk evaluates the runs of train task j
            assert [t["runs"] for t in ev.tasks] == [t["runs"] for t in specs[i].tasks]
    assert specs[-1].stage == "aggregate" and len(specs) == 3 * 4 + 1


def test_packed_tasks_hold_several_runs_and_their_evals_stay_aligned(tmp_path):
    cfg = _cfg(
        "cluster=slurm",
        f"root={tmp_path}",
        "sweep.points=[]",
        "cluster.runs_per_task=3",
        "+sweep.axes={train.seed:[0,1,2,3,4,5,6]}",
    )
    runs = expand(cfg)
    specs = arrays_for(cfg, make_plan(cfg, runs, query_slurm=False))
    train = specs[0]
    assert [len(t["runs"]) for t in train.tasks] == [3, 3, 1]
    assert [rid for t in train.tasks for rid in t["runs"]] == [r.run_id for r in runs]
    assert len(train.calls[0][1]) == 3  # TrainStage gets the three runs' configs
    for spec in specs[1:-1]:
        assert [t["runs"] for t in spec.tasks] == [t["runs"] for t in train.tasks]
    with pytest.raises(ConfigError, match="cluster.runs_per_task='two'"):
        schema.check_launch(_cfg("cluster.runs_per_task=two"))


def test_dependency_strings():
    assert slurm.dependency_string("aftercorr", ["12"], single_task=False) == "aftercorr:12"
    assert slurm.dependency_string("aftercorr", ["12"], single_task=True) == "afterok:12"
    assert slurm.dependency_string("afterany", ["1", "2"], False) == "afterany:1:2"


def test_dry_run_renders_scripts_with_the_profile(tmp_path, capsys):

    cfg = _cfg(
        "cluster=slurm",
        f"root={tmp_path}",
        "sweep=demo",
        "cluster.nodes=2",
        "cluster.partition=debug",
        "cluster.time=1-00:00:00",
        "cluster.setup=['module load cuda']",
        "+cluster.env={NCCL_SOCKET_IFNAME:ib0,NCCL_DEBUG:WARN,ODD:'a b;c'}",
        "train.batch_size=64",
    )
    specs = arrays_for(cfg, make_plan(cfg, expand(cfg), query_slurm=False))
    print_arrays(cfg, specs, scripts=True)
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --partition=debug" in out
    assert "#SBATCH --time=1440" in out and "module load cuda" in out
    # cluster.env: exported, quoted, before the setup lines and the task
    lines = [ln.strip() for ln in out.splitlines()]
    i = lines.index("export NCCL_SOCKET_IFNAME=ib0")
    assert lines[i : i + 4] == [
        "export NCCL_SOCKET_IFNAME=ib0", "export NCCL_DEBUG=WARN", "export ODD='a b;c'",
        "module load cuda",
    ]  # fmt: skip
    assert "#SBATCH --array=0-3%4" in out and "--requeue" in out
    assert (
        "train: 4 task(s)" in out and "eval:digits: 4 task(s), aftercorr on train array #1" in out
    )


def test_a_packed_plan_without_memory_says_each_task_holds_n_processes(tmp_path, capsys):
    # The 300-run load measurement packed 10 runs a task in the default 2,000 MB: every train
    # task exceeded it. The plan says so unless cluster.mem is set.

    for extra, noted in (([], True), (["cluster.mem=4G", "cluster.eval_mem=4G"], False)):
        cfg = _cfg(
            "cluster=slurm", f"root={tmp_path}", "sweep=demo", "cluster.runs_per_task=2", *extra
        )
        print_arrays(cfg, arrays_for(cfg, make_plan(cfg, expand(cfg), query_slurm=False)), False)
        out = capsys.readouterr().out
        assert "train: 2 task(s), 2 runs per task" in out
        assert ("each task holds 2 processes" in out) == noted, out


def test_stage_data_copies_once_per_node_and_returns_the_new_root(tmp_path, monkeypatch):
    from hpc.stages import stage_data

    src = tmp_path / "data" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    (src / "data_batch_1").write_bytes(b"x" * 10)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    root = stage_data(str(tmp_path / "data"), str(tmp_path / "scratch"), local_rank=0)
    assert root == str(tmp_path / "scratch" / "dhm-data-42")
    assert (tmp_path / "scratch" / "dhm-data-42" / "cifar-10-batches-py" / "data_batch_1").exists()
    # Another rank of the node finds the copy and does not copy again.
    assert stage_data(str(tmp_path / "nowhere"), str(tmp_path / "scratch"), local_rank=1) == root


@pytest.mark.slow
def test_local_cluster_runs_the_demo_pipeline_and_relaunch_does_nothing(tmp_path, capsys):
    from hpc.cli import cli

    args = [
        "sweep=demo",
        f"root={tmp_path}",
        "train.epochs=1",
        "train.progress=false",
        "eval.fgsm_eps=[0.0,0.05]",
        "eval.max_images=100",
        "eval.pgd_steps=2",
        "sweep.points=[{model.name:resnet,model.alpha:1.0,model.beta:0.0}]",
    ]
    assert cli(args) == 0
    summary = tmp_path / "demo" / "summary"
    rows = (summary / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and (summary / "plots" / "fgsm_accuracy.png").exists()
    assert (summary / "report.html").exists() and (summary / "manifest.json").exists()
    capsys.readouterr()
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert out.count("train: skip (checkpoints/final.pt exists)") == 3
    assert "eval digits: skip (reuse scores (final-scores-" in out and "summary:" not in out
    assert "aggregate: no (summary complete)" in out
    # Status needs only the sweep's name and root: it reads the stored plan.
    assert cli(["sweep.name=demo", f"root={tmp_path}", "mode=status"]) == 0
    assert "3 runs: 3 done; summary complete" in capsys.readouterr().out
    # Other eval settings: a second variant beside the first, which keeps every file; only
    # the parts the new bound changes are computed (a resnet's scores have no bound: reused).
    before = {p: p.read_bytes() for p in tmp_path.glob("demo/runs/*/eval/*/*.h5")}
    assert cli([*args, "eval.iwae_k=[1,3]"]) == 0
    out = capsys.readouterr().out
    assert "evaluation: variant iwae_k=1+3 (" in out
    assert out.count("compute scores") == 2 * 3  # 2 runs with a VAE x (test set + 2 OOD sets)
    assert out.count("reuse scores") == 4 + 2  # the resnet's 4 sets; the DHMs' validation
    assert out.count("reuse attacks") == 3  # the test set's attacks: no bound in them
    assert {p: p.read_bytes() for p in before} == before
    table = (summary / "results.csv").read_text().splitlines()
    assert "iwae_k3" in table[0] and "iwae_k10" in table[0] and len(table) == 1 + 2 * 3
    assert not list(tmp_path.glob("demo/runs/*/eval-stale"))


def _fake_slurm(monkeypatch, records: dict, pending: dict | None = None):
    """sacct and squeue answers for ledger.attempts, without a cluster."""
    from hpc import ledger

    class Asked:  # in place of the sacct and squeue processes ledger.Asked starts
        def __init__(self, subs):
            self.subs = subs

        def records(self):
            return {
                k: [ledger.SlurmRecord(k, *v) if isinstance(v, tuple) else v for v in vs]
                for k, vs in records.items()
            }

        def pending(self):
            return pending or {}

        def close(self):
            pass

    monkeypatch.setattr(ledger, "Asked", Asked)


def _exception(cfg, job_id: str, line: str) -> None:
    """What submitit pickles for a task whose function raised."""
    import pickle

    from hpc.sweep import sweep_dir

    folder = sweep_dir(cfg) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    trace = f"Traceback (most recent call last):\n  File x\n{line}\n"
    with open(folder / f"{job_id}_0_result.pkl", "wb") as f:
        pickle.dump(("error", trace), f)


def test_relaunch_never_resubmits_pending_or_running_tasks(tmp_path, monkeypatch):
    from hpc import ledger

    cfg = _cfg("cluster=slurm", f"root={tmp_path}", "sweep=demo")
    runs = expand(cfg)
    ids = [r.run_id for r in runs]
    ledger.record_submission(cfg, "train", "500", [{"runs": [i]} for i in ids], None)
    sets = ["digits", "digits-val", "digits_heldout", "digits_ood"]
    for n, set_name in enumerate(sets):
        tasks = [{"runs": [i], "set": set_name} for i in ids]
        ledger.record_submission(cfg, f"eval:{set_name}", str(501 + n), tasks, "aftercorr:500")
    records = {
        "500_0": [("RUNNING",)],
        "500_1": [("FAILED", "1:0")],
        "500_2": [("PENDING",)],
        "500_3": [("COMPLETED", "0:0")],
    }
    for n in range(len(sets)):
        records[f"{501 + n}_1"] = [("CANCELLED",)]
        for task in (0, 2, 3):
            records[f"{501 + n}_{task}"] = [("PENDING",)]
    _fake_slurm(monkeypatch, records, {"500_2": "Priority"})
    _exception(cfg, "500_1", "ValueError: something deterministic")
    # Run 3 trained (its final.pt is a real checkpoint archive); its evals are pending.

    (runs[3].run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}}, runs[3].run_dir / "checkpoints" / "final.pt")
    plan = make_plan(cfg, runs, query_slurm=True)
    assert plan.train == [] and plan.eval_after_train == {} and plan.eval_now == {}
    assert plan.actions[ids[0]][0] == "train: wait (job 500_0 is RUNNING: running)"
    assert plan.actions[ids[2]][0] == "train: wait (job 500_2 is PENDING: pending: Priority)"
    assert plan.actions[ids[1]][0].startswith(
        "train: not retried (job 500_1 ended FAILED: exception: ValueError: something "
        "deterministic); fix the cause, or pass retry_failed=true"
    )
    assert plan.refused == [ids[1]]
    assert plan.actions[ids[3]][1] == "eval digits: wait (job 501_3 is PENDING)"
    # retry_failed=true resubmits it, and only it (with its evals after it).
    retry = _cfg("cluster=slurm", f"root={tmp_path}", "sweep=demo", "retry_failed=true")
    plan = make_plan(retry, runs, query_slurm=True)
    assert [r.run_id for r, _ in plan.train] == [ids[1]]
    assert "retry_failed=true" in plan.actions[ids[1]][0]
    assert {
        (k.set_name, k.role): [r.run_id for r in v] for k, v in plan.eval_after_train.items()
    } == {
        (s, role): [ids[1]]
        for s, role in [
            ("digits", "id"),
            ("digits-val", "val"),
            ("digits_heldout", "ood"),
            ("digits_ood", "ood"),
        ]
    }


@pytest.mark.parametrize(
    "state,extra,expected",
    [
        ("TIMEOUT", {}, "train: from scratch (no checkpoint) (job 600_0 ended TIMEOUT: timeout)"),
        ("PREEMPTED", {}, "ended PREEMPTED: preempted"),
        ("NODE_FAIL", {}, "ended NODE_FAIL: node fail"),
        (
            "OUT_OF_MEMORY",
            {"cluster.mem": "4G", "cluster.max_mem": "16G"},
            "train: resubmit with mem=8192M (x2 after running out of memory with 4G in job 600_0)",
        ),
        (
            "OUT_OF_MEMORY",
            {"cluster.mem": "4G"},
            "train: not resubmitted: ran out of memory with 4G",
        ),
        (
            "OUT_OF_MEMORY",
            {"cluster.mem": "16G", "cluster.max_mem": "16G"},
            "already cluster.max_mem=16G",
        ),
    ],
)
def test_the_next_launch_acts_on_why_a_task_ended(tmp_path, monkeypatch, state, extra, expected):
    from hpc import ledger

    over = [f"{k}={v}" for k, v in extra.items()]
    cfg = _cfg("cluster=slurm", f"root={tmp_path}", "sweep=single", *over)
    (run,) = expand(cfg)
    ledger.record_submission(
        cfg,
        "train",
        "600",
        [{"runs": [run.run_id]}, {"noop": True}],
        None,
        {"mem": extra.get("cluster.mem")} if "cluster.mem" in extra else {},
    )
    _fake_slurm(monkeypatch, {"600_0": [(state, "0:0", 50, "node1", extra.get("cluster.mem", ""))]})
    plan = make_plan(cfg, [run], query_slurm=True)
    assert expected in plan.actions[run.run_id][0]
    resubmitted = bool(plan.train)
    assert resubmitted == ("not resubmitted" not in expected and "already" not in expected)
    if "mem=8192M" in expected:
        assert plan.train[0][1].mem == "8192M"
        spec = arrays_for(cfg, plan)[0]
        assert spec.params["mem"] == "8192M" and spec.group == "mem=8192M"


def test_a_node_that_failed_twice_for_a_run_is_excluded_and_requeue_limits_resume(
    tmp_path, monkeypatch
):
    from hpc import ledger

    cfg = _cfg("cluster=slurm", f"root={tmp_path}", "sweep=single")
    (run,) = expand(cfg)
    ledger.record_submission(cfg, "train", "700", [{"runs": [run.run_id]}], None)
    _fake_slurm(
        monkeypatch,
        {
            "700": [
                ("NODE_FAIL", "0:0", 9, "node2"),
                ("NODE_FAIL", "0:0", 9, "node2"),
                ("FAILED", "1:0", 9, "node1"),
            ]
        },
    )
    _exception(
        cfg,
        "700",
        "hpc.stages.RequeueLimitError: time-out number 4 of this job, beyond "
        "cluster.max_requeues=3",
    )
    plan = make_plan(cfg, [run], query_slurm=True)
    line = plan.actions[run.run_id][0]
    assert "train: from scratch" in line and "RequeueLimitError" in line
    assert "excluding node(s) node2 (failed twice for it)" in line
    spec = arrays_for(cfg, plan)[0]
    assert spec.params["exclude"] == "node2"


def test_points_that_collide_on_one_run_id_but_differ_are_refused():
    with pytest.raises(ConfigError, match="train the same model"):
        expand(_cfg("sweep.points=[{train.compile:true},{train.compile:false}]"))
    # Identical points are one run.
    assert len(expand(_cfg("sweep.points=[{model.beta:2.0},{model.beta:2.0}]"))) == 1


def test_eval_arrays_stay_aligned_with_the_train_array_across_datasets(tmp_path):
    cfg = _cfg(
        "cluster=slurm",
        f"root={tmp_path}",
        "sweep.points=[]",
        "+sweep.axes={data.name:[cifar10,digits,svhn]}",
    )
    specs = arrays_for(cfg, make_plan(cfg, expand(cfg), query_slurm=False))
    by_stage = {s.stage: s for s in specs}
    train_tasks = [t["runs"] for t in by_stage["train"].tasks]
    for stage, spec in by_stage.items():
        if stage.startswith("eval:"):
            assert len(spec.tasks) == len(train_tasks), stage
            for task, runs in zip(spec.tasks, train_tasks, strict=True):
                assert task.get("noop") or task["runs"] == runs
    # cifar10 is in-distribution for one run and OOD for another: two arrays, right roles.
    roles = {
        stage: {call[3] for call in spec.calls if len(call) > 1}
        for stage, spec in by_stage.items()
        if stage.startswith("eval:cifar10:")
    }
    assert roles == {"eval:cifar10:id": {"id"}, "eval:cifar10:ood": {"ood"}}


def test_train_stage_ends_the_process_group(tmp_path):
    # Left to interpreter exit, gloo's threads aborted a finished rank (Slurm then said FAILED).
    import torch.distributed as dist

    from hpc.stages import end_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    assert dist.is_initialized()
    end_process_group()
    assert not dist.is_initialized()
    end_process_group()  # nothing to end: no error


def test_the_plan_costs_the_time_limit_bound_or_the_sweeps_own_history(tmp_path, monkeypatch):

    from hpc import costs, ledger

    cfg = _cfg(
        "cluster=slurm",
        f"root={tmp_path}",
        "sweep=demo",
        "cluster.time=02:00:00",
        "cluster.cpus_per_task=4",
    )
    runs = expand(cfg)
    est = costs.estimate(cfg, make_plan(cfg, runs, query_slurm=False))
    # No history, no calibration: 2 h x 4 CPUs per run, an upper bound, and it says so.
    assert est["unit"] == "CPU" and est["total"].bound
    assert est["train"][1].hours == pytest.approx(4 * 2 * 4)
    assert sum(sum(p.values()) for p in est["per_run"].values()) == pytest.approx(
        est["total"].hours
    )
    assert "<= " in costs.describe(est)[0] and "mode=calibrate" in costs.describe(est)[0]
    over = _cfg(
        "cluster=slurm",
        f"root={tmp_path}",
        "sweep=demo",
        "cluster.time=02:00:00",
        "cluster.cpus_per_task=4",
        "cluster.budget_gpu_hours=10",
    )
    with pytest.raises(ConfigError, match="cluster.budget_gpu_hours=10: this plan costs"):
        costs.check_budget(over, costs.estimate(over, make_plan(over, runs, query_slurm=False)))
    # History: two finished runs of the same model took 360 s on 4 CPUs for their 6 epochs.
    seeds = _cfg(
        "cluster=slurm",
        f"root={tmp_path}",
        "sweep=demo",
        "sweep.points=[]",
        "cluster.cpus_per_task=4",
        "+sweep.axes={train.seed:[0,1]}",
    )
    runs = expand(seeds)  # 4 dhm runs of one width and dataset
    ledger.record_submission(seeds, "train", "800", [{"runs": [r.run_id]} for r in runs[:2]], None)
    for r in runs[:2]:
        (r.run_dir / "checkpoints").mkdir(parents=True)
        torch.save({"model": {}}, r.run_dir / "checkpoints" / "final.pt")
    _fake_slurm(
        monkeypatch,
        {
            f"800_{i}": [("COMPLETED", "0:0", 360, "node1", "", "cpu=4,mem=2000M,node=1")]
            for i in range(2)
        },
    )
    plan = make_plan(seeds, runs, query_slurm=True)
    est = costs.estimate(seeds, plan)
    assert len(plan.train) == 2 and est["train"][1].source == "history"
    assert not est["train"][1].bound
    assert est["train"][1].hours == pytest.approx(2 * 360 * 4 / 3600)  # CPU-hours, 2 runs


def test_runs_per_task_auto_packs_from_the_calibrations_peak_memory(tmp_path):
    import json

    from hpc import costs

    cfg = _cfg(
        "cluster=slurm", f"root={tmp_path}", "cluster.gpus_per_node=1", "cluster.runs_per_task=auto"
    )
    assert costs.auto_runs_per_task(cfg)[0] == 1  # no calibration yet: say so, pack nothing
    path = costs.calibration_path(cfg)
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                "models": {
                    "k": {
                        "images_per_s": 1.0,
                        "device": "H100",
                        "peak_mem_mb": 9000,
                        "device_mem_mb": 81000,
                    }
                }
            }
        )
    )
    n, why = costs.auto_runs_per_task(cfg)
    assert n == 7 and "peak 9000 MB" in why  # floor(0.8 x 81000 / 9000)
    cpu = _cfg("cluster=slurm", f"root={tmp_path}", "cluster.runs_per_task=auto")
    assert costs.auto_runs_per_task(cpu)[0] == 1


def test_status_cell_names_the_exception_class_without_its_module():
    from hpc.status import _short_reason

    line = (
        "exception: hpc.stages.RequeueLimitError: beyond cluster.max_requeues=0: preemption "
        "number 1 of this job; the checkpoint at step 20 is kept and the next launch resumes"
    )
    cell = _short_reason(line)
    assert cell.startswith("exception: RequeueLimitError: beyond cluster.max_requeues=0")
    assert len(cell) == 100 and cell.endswith("...")
    assert _short_reason("exception: KeyError: 'x'") == "exception: KeyError: 'x'"
    assert _short_reason("pending: (PartitionNodeLimit)") == "pending: (PartitionNodeLimit)"


def test_test_only_runs_every_array_and_names_the_first_it_refuses(tmp_path, monkeypatch):
    # The launch's sbatch --test-only calls run concurrently, one per distinct script (the four
    # eval arrays differ only in their job names); the first refused array in plan order is
    # named with Slurm's reason, and no script file is left behind.
    from hpc import slurm

    bin_dir, seen = tmp_path / "bin", tmp_path / "seen"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(
        "#!/bin/bash\n"
        f'echo "$2" >> {seen}\n'
        'if grep -q -- "--mem=1G$" "$2"; then\n'
        '  echo "sbatch: error: Requested node configuration is not available" >&2; exit 1\n'
        "fi\n"
        'echo "sbatch: Job 1 to start at 2026-12-01T00:00:00"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = _cfg("cluster=slurm", f"root={tmp_path}", "sweep=demo", "cluster.eval_mem=1G")
    specs = arrays_for(cfg, make_plan(cfg, expand(cfg), query_slurm=False))
    assert [s.stage for s in specs][:2] == ["train", "eval:digits"] and len(specs) == 6
    with pytest.raises(slurm.SlurmError) as err:
        slurm.test_only(cfg, tmp_path, specs)
    assert "refused the eval:digits array (4 tasks)" in str(err.value)
    assert "Requested node configuration is not available" in str(err.value)
    scripts = seen.read_text().split()  # train, one of the four evals, aggregate
    assert len(scripts) == 3 and not any(Path(p).exists() for p in scripts)
    fake.write_text('#!/bin/bash\necho "sbatch: Job 1 to start"\n')
    slurm.test_only(cfg, tmp_path, specs)  # every array accepted: no error


def test_attempts_read_sacct_and_squeue_started_as_processes(tmp_path, monkeypatch):
    # The Slurm commands themselves (the test's fake ones, printing real sacct -P and squeue
    # text): sacct's states per task and attempt, squeue's reason for the pending tasks.
    from hpc import ledger
    from hpc.state import run_states
    from tests.helpers.fake_slurm import install

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{install(bin_dir)}:{os.environ['PATH']}")
    (tmp_path / "sacct.txt").write_text(
        "700_0|NODE_FAIL|0:0|30|node1|4000M|cpu=2|None||\n"
        "700_0|RUNNING|0:0|60|node2|4000M|cpu=2|None||\n"
        "700_1|PENDING|0:0|0||4000M||Priority||\n"
    )
    (tmp_path / "squeue.txt").write_text("700_1|PENDING|Resources\n700_0|RUNNING|None\n")
    monkeypatch.setenv("FAKE_SLURM_SACCT", str(tmp_path / "sacct.txt"))
    monkeypatch.setenv("FAKE_SLURM_SQUEUE", str(tmp_path / "squeue.txt"))
    cfg = _cfg("cluster=slurm", f"root={tmp_path / 'root'}", "sweep=demo")
    runs = expand(cfg)[:2]
    ledger.record_submission(cfg, "train", "700", [{"runs": [r.run_id]} for r in runs], None)
    states = run_states(cfg, runs, query_slurm=True)
    first, second = (st.last("train") for st in states)
    assert (first.state, first.nodes, [h.state for h in first.history]) == (
        "RUNNING", "node2", ["NODE_FAIL"],
    )  # fmt: skip
    assert (second.state, second.reason) == ("PENDING", "pending: Resources")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sacct at all: says so, by name
    with pytest.raises(ledger.SlurmError, match="reading job states .* sacct -D could not run"):
        run_states(cfg, runs, query_slurm=True)


def test_a_shards_eval_id_is_read_once_per_version_of_the_file(tmp_path, monkeypatch):
    import h5py

    import dhm.core.shard_attrs as R
    from hpc.file_facts import FileFacts

    opened = []
    real = R.shard_eval_id
    monkeypatch.setattr(R, "shard_eval_id", lambda p: opened.append(p) or real(p))
    sweep = tmp_path / "sweep"
    shard = sweep / "runs" / "r1" / "eval" / "digits__0000000-0000284.h5"
    shard.parent.mkdir(parents=True)

    def write(
        eval_id: str,
    ) -> None:  # as dhm.evaluation.evaluate does: a new file renamed into place
        tmp = shard.with_suffix(".tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs["eval_id"] = eval_id
        tmp.replace(shard)

    write("aaaa")
    ids = FileFacts(sweep)
    assert ids.eval_id(shard) == "aaaa" and ids.eval_id(shard) == "aaaa" and len(opened) == 1
    ids.save()
    assert FileFacts(sweep).eval_id(shard) == "aaaa" and len(opened) == 1  # the next launch: kept
    write("bbbb")  # evaluated again with other settings: another inode and mtime
    again = FileFacts(sweep)
    assert again.eval_id(shard) == "bbbb" and len(opened) == 2
    again.save()
    (sweep / "file_facts.json").write_text("{not json")
    assert FileFacts(sweep).eval_id(shard) == "bbbb" and len(opened) == 3  # unreadable: read all
    assert FileFacts(sweep).eval_id(tmp_path / "missing.h5") is None
    moved = sweep / "moved.h5"
    shard.rename(moved)  # moved aside: its fact is dropped once it is looked up and gone
    again = FileFacts(sweep)
    assert again.eval_id(shard) is None
    assert again.eval_id(moved) == "bbbb" and len(opened) == 4
    again.save()
    assert list(FileFacts(sweep).kept) == [f"eval_id:{moved}"]


def test_expand_judges_each_combination_of_a_grid(tmp_path):
    # check_run's parts are judged once per distinct setting of the sections they read; a
    # combination a part refuses is still found wherever it sits in the grid.
    from dhm.core.config import ConfigError

    axes = "+sweep.axes={model.name:[dhm,zmodel],model.vae_split_layer:[0,2],train.seed:[0,1]}"
    with pytest.raises(ConfigError, match="vae_split_layer=2 is not allowed: 0 for model=zmodel"):
        expand(_cfg("sweep.name=x", "sweep.points=[]", axes, f"root={tmp_path}"))
    axes = "+sweep.axes={train.seed:[0,1,2],train.lr:[0.1,0.0]}"
    with pytest.raises(ConfigError, match="'train.lr': 0.0.*train.lr=0.0 is not allowed"):
        expand(_cfg("sweep.name=x", "sweep.points=[]", axes, f"root={tmp_path}"))
    axes = "+sweep.axes={model.alpha:[0.0,1.0],model.beta:[1.0,0.0]}"
    with pytest.raises(ConfigError, match="alpha and beta cannot both be 0"):
        expand(_cfg("sweep.name=x", "sweep.points=[]", axes, f"root={tmp_path}"))


def test_the_run_folder_scan_finds_what_the_os_finds(tmp_path, monkeypatch):
    # scan_runs lists parents instead of stat-ing each run: the same answer for relative
    # paths, trailing slashes and a ".." that passes through a linked folder.
    from dhm.core.layout import scan_runs

    real = tmp_path / "real" / "a"
    (tmp_path / "real" / "runs" / "r1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "real" / "runs" / "r1" / "checkpoints" / "final.pt").write_bytes(b"")
    real.mkdir()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path / "real" / "runs")
    for run_dir in (
        str(tmp_path / "real" / "runs" / "r1"),
        str(tmp_path / "real" / "runs" / "r1") + "/",
        str(tmp_path / "s" / "link" / ".." / "runs" / "r1"),
        "r1",
        "./r1",
        "../runs/r1",
    ):
        assert os.path.isdir(run_dir), run_dir
        assert scan_runs([run_dir])[run_dir].checkpoints == {"final.pt"}, run_dir
    assert scan_runs(["nope"])["nope"].checkpoints == frozenset()


def test_a_checkpoints_verdict_is_kept_until_the_file_changes(tmp_path, monkeypatch):
    import zipfile

    import hpc.file_facts as F
    from hpc.file_facts import FileFacts

    checked = []
    real = F.looks_complete
    monkeypatch.setattr(F, "looks_complete", lambda p: checked.append(p) or real(p))
    final = tmp_path / "sweep" / "runs" / "r1" / "checkpoints" / "final.pt"
    final.parent.mkdir(parents=True)
    with zipfile.ZipFile(final, "w") as archive:
        archive.writestr("archive/data.pkl", b"x")
    whole = final.read_bytes()
    facts = FileFacts(tmp_path / "sweep")
    assert facts.complete(final) and len(checked) == 1
    facts.save()
    assert FileFacts(tmp_path / "sweep").complete(final) and len(checked) == 1  # kept
    cut = final.with_name("cut.tmp")  # replaced by a truncated copy: another file, read again
    cut.write_bytes(whole[:-5])
    cut.replace(final)
    assert not FileFacts(tmp_path / "sweep").complete(final) and len(checked) == 2
    assert not FileFacts(tmp_path / "sweep").complete(final.with_name("none.pt"))


def test_progress_reads_the_last_row_with_a_loss_from_the_end_of_metrics_csv(tmp_path):
    from hpc.state import progress

    logs = tmp_path / "logs"
    logs.mkdir()
    assert progress(tmp_path) is None  # no metrics.csv yet
    header = "step,epoch,lr,loss,ce,val_accuracy\n"
    (logs / "metrics.csv").write_text(header)
    assert progress(tmp_path) == ("-", "-")
    pad = "9" * 150  # rows as wide as real ones (14 columns)
    rows = [f"{s},{s // 100},0.001,{3.0 - s / 1e4:.4f},1.0,{pad}\n" for s in range(1, 5001)]
    # the last rows carry validation only (no loss), more of them than the first 4 KiB holds:
    # the last 40 lines (of at most 64 KiB) are read instead
    rows += [f"5000,49,,,,{pad}{i:04d}\n" for i in range(30)]
    (logs / "metrics.csv").write_text(header + "".join(rows))
    assert progress(tmp_path) == ("50/5000", "2.5")


def test_a_task_given_gpus_without_cuda_fails_at_once_unless_told_cpu(monkeypatch):
    # Slurm gave the task GPUs (SLURM_GPUS_ON_NODE); CUDA cannot use them (its init raises, as
    # on a node without a driver). Training or evaluating on the CPU by accident for days is
    # what this prevents; train.device=cpu / eval.device=cpu is the explicit fallback.

    def no_driver():
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "init", no_driver)
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    require_cuda("the train", "train.device", "auto")  # no GPUs asked: nothing to check
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    for key in ("train.device", "eval.device"):
        with pytest.raises(NoGPUError) as err:
            require_cuda("the eval", key, "auto")
        text = str(err.value)
        assert "CUDA_VISIBLE_DEVICES='0,1'" in text and "Found no NVIDIA driver" in text
        assert f"set {key}=cpu" in text and socket.gethostname() in text
        require_cuda("the eval", key, "cpu")  # the explicit fallback


def test_eval_device_is_checked_and_not_part_of_the_variant():

    cfg = run_config(**{"run_dir": "x"})
    before = V.variant_id(V.settings_of(cfg.eval))
    cfg.eval.device = "cpu"
    check_eval(cfg.eval)
    # where shards are computed does not change what they hold
    assert V.variant_id(V.settings_of(cfg.eval)) == before
    cfg.eval.device = "gpu"
    with pytest.raises(ConfigError, match="eval.device"):
        check_eval(cfg.eval)


def test_cluster_env_names_must_be_shell_variables():
    cfg = _cfg("cluster=slurm")
    cfg.cluster.env = {"NCCL-DEBUG": "INFO"}
    with pytest.raises(ConfigError, match="cluster.env.NCCL-DEBUG"):
        schema.check_launch(cfg)


def test_the_binding_style_picks_the_gpu_request(tmp_path, capsys):

    for style, request in (("node", "--gpus-per-node=2"), ("task", "--gpus-per-task=1")):
        cfg = _cfg("cluster=slurm", f"root={tmp_path}", "sweep=single", "cluster.nodes=2",
                   "cluster.gpus_per_node=2", f"cluster.gpu_bind={style}",
                   "cluster.eval_gpus=1", "train.batch_size=64")  # fmt: skip
        specs = arrays_for(cfg, make_plan(cfg, expand(cfg), query_slurm=False))
        print_arrays(cfg, specs[:2], scripts=True)
        train, evaluation = capsys.readouterr().out.split("eval:", 1)
        assert f"#SBATCH {request}" in train and "#SBATCH --ntasks-per-node=2" in train
        assert "#SBATCH --gpus-per-node=1" in evaluation  # one eval process: its device 0


# sacct -n -P -o hpc.efficiency.FIELDS of a job that kept 1 of its 2 CPUs busy for 20 s (the
# local cluster, 22.05.8): the job line's TotalCPU is its steps' sum; MaxRSS is per step.
SACCT_BUSY = """82|COMPLETED|21|00:19.888|2||1000M|billing=2,cpu=2,mem=1000M,node=1
82.batch|COMPLETED|21|00:00.013|2|10492K||cpu=2,mem=1000M,node=1
82.0|COMPLETED|20|00:19.874|2|13336K||cpu=2,mem=1000M,node=1
83_0|COMPLETED|100|01:50.000|8||16G|billing=8,cpu=8,gres/gpu=1,mem=16G,node=1
83_0.batch|COMPLETED|100|01:50.000|8|900M||cpu=8,mem=16G,node=1
83_1|RUNNING|50|00:00:00|8||16G|billing=8,cpu=8,mem=16G,node=1
"""


def test_efficiency_from_sacct_steps_and_the_advice_names_the_key():

    assert E.cpu_seconds("00:19.888") == pytest.approx(19.888)
    assert E.cpu_seconds("1:02:03") == 3723 and E.cpu_seconds("1-00:00:01") == 86401
    assert E.memory_mb("13336K") == pytest.approx(13.02, abs=0.01)
    assert E.memory_mb("2000Mn") == 2000 and E.memory_mb("1.5G") == 1536 and E.memory_mb("") == 0
    tasks = E.parse_steps(SACCT_BUSY)
    assert set(tasks) == {"82", "83_0"}  # the running task is left out
    busy = tasks["82"]
    assert (busy.elapsed_s, busy.alloc_cpus, busy.max_rss_mb) == (21, 2, pytest.approx(13.02, 0.01))
    subs = [
        {"stage": "train", "job_id": "82", "tasks": [{"runs": ["a"]}],
         "params": {"cpus_per_task": 2, "ntasks_per_node": 1}},
        {"stage": "eval:digits", "job_id": "83", "tasks": [{"runs": ["a"]}, {"runs": ["b"]}],
         "params": {"cpus_per_task": 8}},
    ]  # fmt: skip
    train, ev = E.stage_uses(subs, tasks)
    # 19.888 CPU-s over 21 s x 2 CPUs: 47%, about half, as the workload was.
    assert train.cpu_efficiency == pytest.approx(19.888 / 42) and train.advice == []
    assert (ev.stage, ev.tasks, ev.gpus) == ("eval", 1, 1)
    assert ev.cpus_used == pytest.approx(110 / 100)  # 110 CPU-s in 100 s of 8 CPUs
    assert ev.advice == [
        "eval asks 8 CPUs and uses 1.1: set cluster.eval_cpus=2",
        "eval asks 16.0 GB and uses 0.88 GB: set cluster.eval_mem=2G",
    ]
    # One run's view: only the tasks that held it alone (eval task 1, run b, has not finished).
    assert [u.stage for u in E.stage_uses(subs, tasks, "a")] == ["train", "eval"]
    assert E.stage_uses(subs, tasks, "b") == []
    text = "\n".join(E.lines([train, ev]))
    assert "train: 1 task(s), CPU 47% of 2 a task (0.9 used), memory 13 MB of 1000 MB" in text


def test_gpu_types_from_sinfo_and_a_typed_request(tmp_path, capsys):

    assert _gpu_types("gpu:a100:4(S:0-1),gpu:2,shard:8") == {"a100": 4, "": 2}
    node = Partition("p", False, None, gpu_types={"n": _gpu_types("gpu:a100:4(S:0-1),gpu:2")})
    assert node.gpus == {"n": 6} and _gpu_types("(null)") == {}
    for style, request in (("node", "--gpus-per-node=a100:2"), ("task", "--gpus-per-task=a100:1")):
        args = ["cluster=slurm", f"root={tmp_path}", "sweep=single", "cluster.gpus_per_node=2"]
        cfg = _cfg(*args, f"cluster.gpu_bind={style}", "cluster.gpu_type=a100")
        print_arrays(cfg, arrays_for(cfg, make_plan(cfg, expand(cfg), query_slurm=False))[:1], True)
        assert f"#SBATCH {request}" in capsys.readouterr().out


def test_the_plan_counts_each_piece_of_work_once_across_launches(tmp_path):
    # A launch estimates train and every eval set of a run and writes the plan before its
    # sbatch calls; when those fail or are cancelled, the relaunch plans the same pieces again.
    # They are counted once (the first estimate of each), new pieces are added.

    cfg = _cfg(f"root={tmp_path}", "sweep=single")
    runs = expand(cfg)
    rid = runs[0].run_id
    write_plan(cfg, runs, {rid: {"train": 8.0, "eval:digits": 1.0}})
    write_plan(cfg, runs, {rid: {"train": 6.0, "eval:digits": 1.0}})  # the same work, again
    write_plan(cfg, runs, {rid: {"eval:svhn": 0.5}})  # a new piece
    (row,) = read_plan(tmp_path / "single" / "plan.json")["runs"]
    assert row["estimated"] == {"train": 8.0, "eval:digits": 1.0, "eval:svhn": 0.5}
    assert row["estimated_hours"] == 9.5
