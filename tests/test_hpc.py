"""The cluster side without a cluster: sweeps, run ids, Slurm env mapping, checks, plans."""

from __future__ import annotations

import pytest

from dhm.config import ConfigError
from hpc import slurm
from hpc.distributed import expand_hostlist, master_port, torch_env_from_slurm
from hpc.launcher import arrays_for, compose_config, make_plan
from hpc.sweep import expand, grid_points, run_id_of


def _cfg(*overrides: str):
    return compose_config(list(overrides))


def test_every_shipped_sweep_and_cluster_profile_composes_and_expands(tmp_path):
    sizes = {"single": 1, "demo": 4, "alpha_beta": 12, "split_layer": 10, "iwae": 6}
    for name, n in sizes.items():
        cfg = _cfg(f"sweep={name}", f"root={tmp_path}")
        runs = expand(cfg)
        assert len(runs) == n, name
        assert len({r.run_id for r in runs}) == n
        assert all(r.run_dir.parent == tmp_path / name / "runs" for r in runs)
    for cluster in ("local", "slurm"):
        slurm.check_cluster(_cfg(f"cluster={cluster}"), query_slurm=False)


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
        (["cluster=slurm", "cluster.partition='gpu;rm -rf /'"], "not allowed in an sbatch"),
        (["cluster=slurm", "cluster.gpus_per_node=4", "cluster.tasks_per_node=2"], "must equal"),
        (["cluster=slurm", "cluster.nodes=3", "train.batch_size=400"], "does not split over 3"),
        (["cluster=slurm", "+cluster.extra_sbatch={mail-user:'a b'}"], "extra_sbatch.mail-user"),
        (["cluster=slurm", "cluster.setup=['module load x\necho']"], "cluster.setup[0]"),
    ],
)
def test_bad_launch_values_name_the_key(overrides, message):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        slurm.check_cluster(cfg, query_slurm=False)
        expand(cfg)


def test_fast_expansion_equals_the_schema_path_value_for_value(tmp_path):
    # expand() validates each distinct swept value once and copies plain data per run; each
    # run must equal the config OmegaConf builds point by point, and its YAML (what the stages
    # receive) must read back to the same config and run id.
    from omegaconf import OmegaConf

    from dhm.config import RunConfig, from_yaml
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

    from dhm.config import from_yaml

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
        expand(_cfg("sweep.points=[]", "+sweep.axes={}", "sweep.name=none"))
    # The single sweep is one explicit point: the base config.
    assert len(expand(_cfg())) == 1


@pytest.mark.parametrize(
    "text,minutes",
    [("90", 90), ("30:30", 31), ("04:00:00", 240), ("1-00", 1440), ("1-2:30", 1590),
     ("2-00:00:01", 2881)],
)  # fmt: skip
def test_time_limits_parse_like_slurm(text, minutes):
    assert slurm.parse_time_minutes(text, "cluster.time") == minutes


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
    assert torch_env_from_slurm({}) == {}


def test_sacct_output_parses_arrays_and_ranges():
    text = "\n".join(
        ["101_0|COMPLETED", "101_1|FAILED", "101_[2-4%2]|PENDING", "102|CANCELLED by 0",
         "102.batch|CANCELLED", "103_5|RUNNING"]
    )  # fmt: skip
    states = slurm.parse_sacct(text)
    assert states[("101", 0)] == "COMPLETED" and states[("101", 1)] == "FAILED"
    assert states[("101", 3)] == "PENDING" and states[("102", None)] == "CANCELLED"
    assert states[("103", 5)] == "RUNNING"
    # Tasks split off before the rest of the array was cancelled keep their own state.
    split = slurm.parse_sacct("107_0|COMPLETED\n107_[0-1%2]|CANCELLED\n")
    assert split == {("107", 0): "COMPLETED", ("107", 1): "CANCELLED"}


def test_sbatch_calls_do_not_grow_with_the_grid(tmp_path):
    cfg = _cfg("cluster=slurm", f"root={tmp_path}", "+sweep.axes={train.seed:[0,1,2,3,4,5,6,7]}",
               "sweep.name=big")  # fmt: skip
    specs = arrays_for(cfg, make_plan(cfg, expand(cfg), query_slurm=False))
    small = _cfg(
        "cluster=slurm", f"root={tmp_path}", "+sweep.axes={train.seed:[0]}", "sweep.name=one"
    )
    small_specs = arrays_for(small, make_plan(small, expand(small), query_slurm=False))
    assert [s.stage for s in specs] == [s.stage for s in small_specs] == [
        "train", "eval:digits", "eval:digits_ood", "aggregate"]  # fmt: skip
    assert len(specs[0].tasks) == 8 and len(specs[1].tasks) == 8
    assert specs[1].depends_on == "train" and specs[1].dependency_kind == "aftercorr"
    assert specs[-1].dependency_kind == "afterany"


def test_dependency_strings():
    assert slurm.dependency_string("aftercorr", ["12"], single_task=False) == "aftercorr:12"
    assert slurm.dependency_string("aftercorr", ["12"], single_task=True) == "afterok:12"
    assert slurm.dependency_string("afterany", ["1", "2"], False) == "afterany:1:2"


def test_dry_run_renders_scripts_with_the_profile(tmp_path, capsys):
    from hpc.launcher import print_arrays

    cfg = _cfg("cluster=slurm", f"root={tmp_path}", "sweep=demo", "cluster.nodes=2",
               "cluster.partition=debug", "cluster.time=1-00:00:00",
               "cluster.setup=['module load cuda']", "train.batch_size=64")  # fmt: skip
    specs = arrays_for(cfg, make_plan(cfg, expand(cfg), query_slurm=False))
    print_arrays(cfg, specs, scripts=True)
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --partition=debug" in out
    assert "#SBATCH --time=1440" in out and "module load cuda" in out
    assert "#SBATCH --array=0-3%4" in out and "--requeue" in out
    assert "train: 4 task(s)" in out and "eval:digits: 4 task(s), aftercorr on train" in out


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
    from hpc.launcher import cli

    args = ["sweep=demo", f"root={tmp_path}", "train.epochs=1", "train.progress=false",
            "eval.fgsm_eps=[0.0,0.05]", "eval.max_images=100",
            "sweep.points=[{model.name:resnet,model.alpha:1.0,model.beta:0.0}]"]  # fmt: skip
    assert cli(args) == 0
    summary = tmp_path / "demo" / "summary"
    rows = (summary / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and (summary / "plots" / "fgsm_accuracy.png").exists()
    capsys.readouterr()
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert out.count("train: skip (checkpoints/final.pt exists)") == 3
    assert "eval digits: skip (shards complete)" in out and "summary:" not in out
    assert cli([*args, "mode=status"]) == 0
    assert "3 runs: 3 done; summary exists" in capsys.readouterr().out
    # Other eval settings: the old shards are moved aside (kept) and every run re-evaluated.
    assert cli([*args, "eval.iwae_k=[1,3]"]) == 0
    out = capsys.readouterr().out
    assert out.count("made with other eval settings") == 3 * 2  # 3 runs x 2 sets
    header = (summary / "results.csv").read_text().splitlines()[0]
    assert "iwae_k3" in header and "iwae_k10" not in header
    assert len(list(tmp_path.glob("demo/runs/*/eval-stale/*/*.h5"))) == 3 * 2


def test_relaunch_never_resubmits_pending_or_running_tasks(tmp_path, monkeypatch):
    from hpc import ledger

    cfg = _cfg("cluster=slurm", f"root={tmp_path}", "sweep=demo")
    runs = expand(cfg)
    # A first launch recorded its arrays; Slurm says run 0 is still training, run 1's train
    # task failed, and the eval tasks of both are pending behind them.
    ids = [r.run_id for r in runs]
    ledger.record_submission(cfg, "train", "500", [{"run_id": i} for i in ids], None)
    for n, set_name in enumerate(("digits", "digits_ood")):
        tasks = [{"run_id": i, "set": set_name} for i in ids]
        ledger.record_submission(cfg, f"eval:{set_name}", str(501 + n), tasks, "aftercorr:500")
    states = {
        ("500", 0): "RUNNING", ("500", 1): "FAILED", ("500", 2): "PENDING",
        ("500", 3): "COMPLETED", ("501", 1): "CANCELLED", ("502", 1): "CANCELLED",
    }  # fmt: skip
    for job in ("501", "502"):
        for task in (0, 2, 3):
            states[(job, task)] = "PENDING"
    monkeypatch.setattr(ledger, "job_states", lambda job_ids: states)
    # Run 3 trained (its final.pt exists); its evals are pending in Slurm.
    (runs[3].run_dir / "checkpoints").mkdir(parents=True)
    (runs[3].run_dir / "checkpoints" / "final.pt").write_bytes(b"")
    plan = make_plan(cfg, runs, query_slurm=True)
    assert [r.run_id for r in plan.train] == [ids[1]]  # only the failed one
    assert {s: [r.run_id for r in rs] for s, rs in plan.eval_after_train.items()} == {
        ("digits", "id"): [ids[1]], ("digits_ood", "ood"): [ids[1]]}  # fmt: skip
    assert plan.eval_now == {}
    assert plan.actions[ids[0]][0] == "train: wait (job 500_0 is RUNNING)"
    assert "last train job 500_1 ended FAILED" in plan.actions[ids[1]][0]
    assert plan.actions[ids[3]][1] == "eval digits: wait (job 501_3 is PENDING)"


def test_points_that_collide_on_one_run_id_but_differ_are_refused():
    with pytest.raises(ConfigError, match="train the same model"):
        expand(_cfg("sweep.points=[{train.compile:true},{train.compile:false}]"))
    # Identical points are one run.
    assert len(expand(_cfg("sweep.points=[{model.beta:2.0},{model.beta:2.0}]"))) == 1


def test_eval_arrays_stay_aligned_with_the_train_array_across_datasets(tmp_path):
    cfg = _cfg("cluster=slurm", f"root={tmp_path}", "sweep.points=[]",
               "+sweep.axes={data.name:[cifar10,digits,svhn]}")  # fmt: skip
    specs = {s.stage: s for s in arrays_for(cfg, make_plan(cfg, expand(cfg), query_slurm=False))}
    train_runs = [t["run_id"] for t in specs["train"].tasks]
    for stage, spec in specs.items():
        if stage.startswith("eval:"):
            assert len(spec.tasks) == len(train_runs), stage
            for task, rid in zip(spec.tasks, train_runs, strict=True):
                assert task.get("noop") or task["run_id"] == rid
    # cifar10 is in-distribution for one run and OOD for another: two arrays, right roles.
    roles = {stage: {call[3] for call in spec.calls if len(call) > 1}
             for stage, spec in specs.items() if stage.startswith("eval:cifar10:")}  # fmt: skip
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
