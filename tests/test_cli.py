"""The command line a Hydra user expects, run as a user runs it: ``python launch.py ...``."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dhm.core.config import ConfigError
from hpc.cli import cli, compose_config
from hpc.schema import check_cluster, on_slurm
from hpc.sweep import expand, run_id_of

REPO = Path(__file__).resolve().parents[1]


def launch(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch.py"), *args]
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def test_help_lists_the_config_groups_and_their_options():
    out = launch("--help")
    assert out.returncode == 0, out.stderr
    for line in (
        "model: dhm, resnet, vae, zmodel",
        "sweep: alpha_beta, demo, iwae, single",
        "cluster: local, slurm",
        "data: cifar10, digits, svhn",
    ):
        assert line in out.stdout
    assert "--multirun,-m" in out.stdout and "model:\n  name:" not in out.stdout
    bad = launch("--help", "model=typo")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "model/typo" in bad.stderr and "Traceback" not in bad.stderr


def test_cfg_info_and_package_are_hydras():
    job = launch("--cfg", "job", "model=resnet")
    assert job.returncode == 0 and "name: resnet" in job.stdout and "hydra:" not in job.stdout
    hydra = launch("--cfg", "hydra")
    assert hydra.returncode == 0 and "hydra:" in hydra.stdout and "help:" in hydra.stdout
    pkg = launch("--cfg", "job", "--package", "model")
    assert pkg.returncode == 0 and pkg.stdout.startswith("# @package model")
    info = launch("--info", "defaults")
    assert info.returncode == 0 and "Defaults List" in info.stdout and "sweep/demo" in info.stdout


def test_shell_completion_installs_and_answers_queries():
    install = launch("-sc", "install=bash")
    assert install.returncode == 0 and "complete -o nospace" in install.stdout
    line = "python launch.py mod"
    query = launch("-sc", "query=bash", env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert query.returncode == 0 and "model=" in query.stdout.split()


def test_config_name_path_and_dir(tmp_path):
    (tmp_path / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\nroot: elsewhere\n")
    out = launch("-cd", str(tmp_path), "-cn", "mine", "--cfg", "job")
    assert out.returncode == 0 and "root: elsewhere" in out.stdout, out.stderr
    copy = tmp_path / "confs"
    subprocess.run(["cp", "-r", str(REPO / "configs"), str(copy)], check=True)
    (copy / "sweep" / "tiny.yaml").write_text(
        "# @package _global_\nsweep:\n  name: tiny\n  points: [{}]\n"
    )
    out = launch("-cp", str(copy), "sweep=tiny", "--cfg", "job")
    assert out.returncode == 0 and "name: tiny" in out.stdout
    assert launch("-cp", str(tmp_path / "nope")).returncode == 2


def test_multirun_comma_lists_and_ranges_become_sweep_axes(tmp_path):
    cfg = compose_config(["sweep=single", "model.beta=0.1,1", "train.seed=range(3)"], multirun=True)
    runs = expand(cfg)
    assert sorted((r.cfg.model.beta, r.cfg.train.seed) for r in runs) == [
        (b, s) for b in (0.1, 1.0) for s in range(3)
    ]
    # A config group sweep becomes the settings each option sets.
    cfg = compose_config(["sweep=single", "model=dhm,resnet", "data=cifar10,svhn"], multirun=True)
    kinds = sorted(
        (r.cfg.model.name, r.cfg.model.beta, r.cfg.data.name, r.cfg.data.val_size)
        for r in expand(cfg)
    )
    assert kinds == [
        ("dhm", 1.0, "cifar10", 8000),
        ("dhm", 1.0, "svhn", 14652),
        ("resnet", 0.0, "cifar10", 8000),
        ("resnet", 0.0, "svhn", 14652),
    ]
    # On a sweep, -m multiplies every point; a point's own setting wins.
    cfg = compose_config(["sweep=demo", "train.seed=0,1"], multirun=True)
    assert len(expand(cfg)) == 8
    out = launch("-m", "sweep=single", "model.beta=0.1,1", f"root={tmp_path}", "mode=dry_run")
    assert out.returncode == 0, out.stderr
    assert "sweep single: 2 runs" in out.stdout and "model.beta=0.1" in out.stdout
    for bad, message in (
        (["-m", "model.beta=interval(0,1)"], "interval() sweeps"),
        (["-m", "cluster=local,slurm"], "one launch has one cluster"),
        (["-m", "eval.iwae_k=[1],[10]"], "eval settings take lists"),
        (["-m", "model.beta=0.1"], "needs a sweep override"),
        (["model.beta=0.1,1"], "Ambiguous value for argument"),
    ):
        res = launch(*bad, "mode=dry_run")
        assert res.returncode == 2 and message in res.stderr, (bad, res.stderr)


def test_hydra_overrides_and_added_unknown_keys_are_refused(tmp_path):
    for args, message in (
        (["hydra.run.dir=x"], "hydra.* settings are not used"),
        (["+model.no_such_key=1"], "model.no_such_key is not a config key"),
        (["++train.nope=2"], "train.nope is not a config key"),
        (["+nope=2"], "nope is not a config key"),
    ):
        out = launch(*args, f"root={tmp_path}", "mode=dry_run")
        assert out.returncode == 2, (args, out.stdout)
        assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_the_bare_command_is_the_offline_demo():
    cfg = compose_config([])
    assert cfg.sweep.name == "demo" and cfg.cluster.name == "local" and cfg.data.name == "digits"
    assert len(expand(cfg)) == 4 and cfg.train.epochs == 6
    assert "the offline demo" in (REPO / "launch.py").read_text()


def test_run_ids_of_the_shipped_sweeps_are_pinned():
    # Run ids hash only what differs from the schema's defaults: adding a field with a neutral
    # default moves no run. A change that moves these must be deliberate (IDENTITY_VERSION).
    pinned = json.loads((REPO / "tests" / "run_ids.json").read_text())
    for sweep, ids in pinned.items():
        assert [r.run_id for r in expand(compose_config([f"sweep={sweep}"]))] == ids, sweep


def test_identity_3_moves_only_the_runs_whose_learned_sigma_now_trains_otherwise():
    # Identity 3 (train.sigma_lr) changed what a learned sigma trains, and only that: the
    # thesis study (likelihood thesis) and classifiers keep their ids, and train.sigma_lr=null
    # (the old behaviour) gives every run its version-2 id back (run_ids_v2.json: the ids
    # pinned before the change; the demo left it, as its own config changed to sigma=optimal).
    now = json.loads((REPO / "tests" / "run_ids.json").read_text())
    v2 = json.loads((REPO / "tests" / "run_ids_v2.json").read_text())
    assert now["alpha_beta"] == v2["alpha_beta"]
    for sweep, ids in v2.items():
        runs = expand(compose_config([f"sweep={sweep}", "train.sigma_lr=null"]))
        assert [r.run_id for r in runs] == ids, sweep
        moved = {
            r.cfg.model.name for r, old in zip(runs, now[sweep], strict=True) if r.run_id != old
        }
        assert "resnet" not in moved


def test_the_identity_defaults_are_what_omegaconf_makes_of_the_schema():
    # Run ids compare with dataclasses.asdict(RunConfig()): the same data, types included,
    # as OmegaConf's structured config of RunConfig, which validates every composed value.
    from omegaconf import OmegaConf

    import dhm.core.config as C

    schema = OmegaConf.to_container(OmegaConf.structured(C.RunConfig))
    assert json.dumps(schema, sort_keys=True) == json.dumps(C.RUN_DEFAULTS, sort_keys=True)


def test_a_new_field_with_a_neutral_default_moves_no_run_id(monkeypatch):
    import dhm.core.config as C

    (run,) = expand(compose_config(["sweep=single", "model.beta=2.0"]))
    before = run_id_of(run.cfg)
    data = run.cfg.plain()
    data["model"]["future_knob"] = 3  # a field the schema gains later, at its default
    defaults = {**C.RUN_DEFAULTS, "model": {**C.RUN_DEFAULTS["model"], "future_knob": 3}}
    monkeypatch.setattr(C, "RUN_DEFAULTS", defaults)
    assert run_id_of(data) == before
    data["model"]["future_knob"] = 4  # set to something else: another run
    assert run_id_of(data) != before


def test_status_cancel_and_aggregate_need_only_the_sweep_name(tmp_path, capsys):
    args = [
        "sweep=single",
        "sweep.name=byname",
        f"root={tmp_path}",
        "model.width=4",
        "model.latent_dim=4",
        "train.epochs=1",
        "train.batch_size=100",
        "eval.max_images=50",
        "eval.pgd_steps=0",
        "eval.fgsm_eps=[0.0]",
        "eval.iwae_k=[1]",
        "train.progress=false",
        "eval.batch_size=50",
    ]
    assert cli(args) == 0
    capsys.readouterr()
    assert cli(["sweep.name=byname", f"root={tmp_path}", "mode=status"]) == 0
    assert "1 runs: 1 done; summary complete" in capsys.readouterr().out
    # aggregate with other (or no) overrides keeps the plan and the summary as they were
    plan = (tmp_path / "byname" / "plan.json").read_text()
    assert cli(["sweep.name=byname", f"root={tmp_path}", "mode=aggregate"]) == 0
    assert (tmp_path / "byname" / "plan.json").read_text() == plan
    # launching other runs under that name is refused, and says how to start a new sweep
    assert cli([*args, "model.beta=3.0"]) == 2
    err = capsys.readouterr().err
    assert "plans other runs" in err and "sweep.name=" in err and "replan=true" in err
    assert (tmp_path / "byname" / "plan.json").read_text() == plan
    assert cli(["sweep.name=nosuch", f"root={tmp_path}", "mode=status"]) == 2


def test_the_follow_line_is_shell_quoted():
    line = ["python", "launch.py", "sweep.name=a", "root=/x y", "mode=status"]
    assert shlex.split(shlex.join(line)) == line
    readme = (REPO / "README.md").read_text()
    for cmd in [ln for ln in readme.splitlines() if "sweep.axes={" in ln]:
        assert "'+sweep.axes={" in cmd  # quoted: bash would brace-expand it


def test_selections_act_on_part_of_a_sweep(tmp_path, capsys):
    args = ["sweep=demo", f"root={tmp_path}", "mode=dry_run"]
    cfg = compose_config(args)
    runs = expand(cfg)
    assert cli([*args, f"runs=[{runs[0].run_id[:6]}]"]) == 0
    out = capsys.readouterr().out
    assert "4 runs in" in out and "1 selected" in out and runs[1].run_id not in out
    assert cli([*args, "+where={model.name:[resnet,vae]}"]) == 0
    out = capsys.readouterr().out
    assert "2 selected" in out
    assert cli([*args, "runs=[ffffffff]"]) == 2
    assert "names no run of the 4 in the plan" in capsys.readouterr().err


def test_the_launcher_receives_what_hydra_composes(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    fresh = compose_config(["sweep=single", "model.beta=0.5", "mode=dry_run", "root=first"])
    seen = []
    monkeypatch.setattr("hpc.launcher.main", lambda cfg, argv: seen.append(cfg) or 0)
    monkeypatch.setattr("hpc.stored.main", lambda cfg, argv: seen.append(cfg) or 0)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\nroot: first\n")
    line = ["-cd", str(extra), "-cn", "mine", "sweep=single", "model.beta=0.5", "mode=dry_run"]
    assert cli(line) == 0
    cfg = seen[-1]  # typed as Hydra composes it, flags included
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(fresh)
    assert OmegaConf.get_type(cfg.cluster) is OmegaConf.get_type(fresh.cluster)
    assert OmegaConf.is_struct(cfg) == OmegaConf.is_struct(fresh)
    (extra / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\nroot: second\n")
    assert cli([*line[:-1], "mode=status", "mode=report"]) == 0  # a file changed; last mode wins
    assert seen[-1].root == "second" and seen[-1].mode == "report"
    assert cli([*line[:-1], "model.beta=oops"]) == 2


def test_a_sigma_rate_swept_beside_runs_that_learn_no_sigma_trains_those_once():
    # train.sigma_lr trains nothing in a resnet (or a fixed or optimal sigma): crossing the
    # demo's resnet point with two rates is one resnet run, not a refused duplicate.
    cfg = compose_config(["sweep=demo", "model.sigma=global", "train.sigma_lr=0.02,0.1"], True)
    runs = expand(cfg)
    names = [r.cfg.model.name for r in runs]
    assert names.count("resnet") == 1 and names.count("vae") == 2 and names.count("dhm") == 4


def test_a_site_profile_under_its_own_name_through_config_dir(tmp_path):
    # README: copy slurm.yaml to <site>.yaml and run with cluster=<site>. The copy names itself
    # and keeps kind: slurm; without a kind, a profile named other than local or slurm is
    # refused (it must not run locally by mistake), naming the key.

    site = tmp_path / "site" / "cluster"
    site.mkdir(parents=True)
    text = (REPO / "configs" / "cluster" / "slurm.yaml").read_text()
    (site / "mysite.yaml").write_text(text.replace("name: slurm ", "name: mysite ", 1))
    out = launch("-cd", str(tmp_path / "site"), "cluster=mysite", "--cfg", "job")
    assert out.returncode == 0 and "name: mysite" in out.stdout and "kind: slurm" in out.stdout
    cfg = compose_config(["cluster=slurm", "cluster.name=mysite"])
    check_cluster(cfg.cluster)
    assert on_slurm(cfg)
    cfg.cluster.kind = None
    with pytest.raises(ConfigError, match="cluster.kind is missing in profile 'mysite'"):
        check_cluster(cfg.cluster)
    for key, value, word in (("kind", "pbs", "cluster.kind"), ("name", "my site", "cluster.name")):
        cfg = compose_config(["cluster=slurm", f"cluster.{key}={value!r}"])
        with pytest.raises(ConfigError, match=word):
            check_cluster(cfg.cluster)
