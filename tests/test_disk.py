"""Disk: a sweep's estimate (model sizes counted without torch, shards, summary) against what
training and evaluation write, the quota check, the sweep of killed writers' temporary files,
and trained runs dropping their step checkpoints."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from dhm.core import checkpoint as ckpt_io
from dhm.core import layout
from dhm.core import variants as V
from dhm.core.config import ConfigError, run_config, to_yaml
from dhm.core.fsutil import atomic_path
from dhm.core.sizes import checkpoint_bytes, human, run_state_size
from dhm.summary.aggregate import aggregate
from dhm.training.train import make_optimizer, model_for, param_groups, train, training_loss
from hpc import disk
from hpc.cli import compose_config
from hpc.stages import EvalStage
from hpc.sweep import expand, run_id_of, sweep_dir
from tests.helpers.configs import small_config

REPO = Path(__file__).resolve().parents[1]

MODELS = [  # (name, overrides): every model kind, two widths, split layers, two latent sizes
    ("dhm", {}),
    ("dhm", {"model.width": 8, "model.latent_dim": 16}),
    ("dhm", {"model.vae_split_layer": 2}),
    ("dhm", {"model.vae_split_layer": 4, "model.sigma": "channel", "model.latent_dim": 16}),
    ("dhm", {"model.vae_split_layer": 1, "model.norm": "group", "model.likelihood": "thesis"}),
    ("resnet", {"model.beta": 0.0}),
    ("resnet", {"model.beta": 0.0, "model.width": 8}),
    ("vae", {"model.alpha": 0.0}),
    ("vae", {"model.alpha": 0.0, "model.sigma": "channel", "model.latent_dim": 16}),
    ("zmodel", {}),
    ("zmodel", {"model.width": 8, "data.name": "cifar10"}),
]


def _cfg(name: str, overrides: dict):
    base = {"run_dir": "x", "model.width": 4, "model.latent_dim": 8, "model.name": name}
    return run_config(**{**base, **overrides})


@pytest.mark.parametrize(
    "name,overrides", MODELS, ids=[f"{n}{i}" for i, (n, _) in enumerate(MODELS)]
)
def test_the_state_dict_counted_without_torch_is_the_models(name, overrides):
    cfg = _cfg(name, overrides)
    state = model_for(cfg).state_dict()
    size = run_state_size(cfg)
    assert size.tensors == len(state)
    assert size.numel == sum(t.numel() for t in state.values())
    assert size.bytes == sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize("name,overrides", [MODELS[i] for i in (0, 2, 5, 7)], ids=str)
def test_checkpoint_bytes_are_within_a_percent_of_torch_save(name, overrides):
    # One optimizer step, then the checkpoint dict as checkpoint_state builds it, in memory.
    cfg = _cfg(name, overrides)
    torch.manual_seed(0)
    model = model_for(cfg)
    optimizer = make_optimizer(param_groups(model, cfg.train), cfg.train)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 50)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 8, (4,))
    loss, _ = training_loss(model(x), y, cfg.model, model)
    loss.backward()
    optimizer.step()
    state = {
        "format": 2,
        "model": model.state_dict(),
        "epoch": 1,
        "batch": 0,
        "global_step": 9,
        "seed": 0,
        "world_size": 1,
        "torch_threads": 2,
        "config_yaml": to_yaml(cfg),
        "eval_log_sigma": -2.0,
        "eval_sigma_source": "fitted on 200 validation images",
    }
    for final in (True, False):
        if not final:
            state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
        buf = io.BytesIO()
        torch.save(state, buf)
        real = len(buf.getvalue())
        assert abs(checkpoint_bytes(cfg, final=final) / real - 1) < 0.01, (final, real)


def _du(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


TINY = [  # two steps an epoch (200 training images), fifty images per evaluated set
    "model.width=4", "model.latent_dim=4", "data.val_size=959", "train.epochs=2",
    "train.batch_size=100", "train.checkpoint_every_steps=1", "train.val_max_images=50",
    "train.progress=false", "train.device=cpu", "eval.device=cpu", "eval.batch_size=50",
    "eval.max_images=50", "eval.pgd_steps=1", "eval.fgsm_eps=[0.0,0.03]", "eval.iwae_k=[2]",
]  # fmt: skip


@pytest.mark.slow
def test_the_estimate_of_a_tiny_sweep_is_within_2x_of_what_it_writes(tmp_path, monkeypatch):
    base = ["sweep=single", f"root={tmp_path}", *TINY]
    runs = expand(compose_config([*base, "model.name=dhm"]))
    runs += expand(compose_config([*base, "model.name=resnet", "model.beta=0.0"]))
    sweep = sweep_dir(compose_config(base))
    before = disk.estimate(runs, sweep, snapshot_bytes=1000)
    assert before.per_run[0].files == 3  # keep_checkpoints=2 and the one being written

    # The peak: the checkpoints/ folder just before each prune (the new step checkpoint written).
    peak: dict[Path, int] = {}
    real_prune = ckpt_io.prune

    def measuring_prune(folder, keep):
        peak[Path(folder)] = max(peak.get(Path(folder), 0), _du(Path(folder)))
        real_prune(folder, keep)

    monkeypatch.setattr(ckpt_io, "prune", measuring_prune)
    for run in runs:
        train(run.cfg)
        for name, role in layout.eval_sets(run.cfg):
            EvalStage()(run.yaml, name, role)
    aggregate(sweep, allow_partial=True, plots=True)

    written = {
        "checkpoints": sum(peak.values()),
        "checkpoints_trained": sum(_du(r.run_dir / "checkpoints") for r in runs),
        "shards": sum(_du(r.run_dir / "eval") for r in runs),
        "summaries": _du(sweep / "summary"),
    }
    for part, real in written.items():
        guess = getattr(before, part)
        assert real / 2 <= guess <= 2 * real, (part, guess, real)
    assert before.checkpoints_trained < before.checkpoints / 2  # only final.pt stays
    assert abs(before.checkpoints_trained / written["checkpoints_trained"] - 1) < 0.05
    assert abs(before.shards / written["shards"] - 1) < 0.25
    # Once the files exist they are what the estimate counts.
    after = disk.estimate(runs, sweep, snapshot_bytes=1000)
    assert after.checkpoints == after.checkpoints_trained == written["checkpoints_trained"]
    assert after.shards == after.shards_on_disk == written["shards"]
    assert after.summaries >= written["summaries"]
    assert "2 runs measured on disk" in after.lines()[0]


def test_the_estimate_reads_the_sizes_of_checkpoints_and_shards_on_disk(tmp_path):
    cfg = compose_config(["sweep=demo", f"root={tmp_path}", "eval.max_images=80"])
    runs = expand(cfg)
    first, second = runs[0].run_dir, runs[1].run_dir
    (first / "checkpoints").mkdir(parents=True)
    (first / "checkpoints" / "final.pt").write_bytes(b"x" * 1234)
    (first / "checkpoints" / "step_000000010.pt").write_bytes(b"x" * 500)
    (second / "checkpoints").mkdir(parents=True)
    (second / "checkpoints" / "step_000000010.pt").write_bytes(b"x" * 3000)
    set_name, _ = layout.eval_sets(runs[0].cfg)[0]
    (first / "eval").mkdir()
    (first / "eval" / layout.shard_name(set_name, 0, 80)).write_bytes(b"x" * 777)

    est = disk.estimate(runs, sweep_dir(cfg))
    one, two = est.per_run[0], est.per_run[1]
    assert (one.peak, one.trained, one.measured) == (1734, 1734, True)
    keep = runs[1].cfg.train.keep_checkpoints
    assert two.largest == 3000 and two.peak >= (keep + 1) * 3000 and two.measured
    assert two.trained < 3000  # final.pt (no optimizer) once the step checkpoints are dropped
    written, todo = disk.run_shards(runs[0].cfg, [layout.shard_name(set_name, 0, 80)])
    assert written == 777 and todo > 0
    assert est.shards_on_disk == 777
    untouched = disk.estimate(runs[2:], sweep_dir(cfg))
    assert not any(r.measured for r in untouched.per_run)


def test_the_estimate_counts_kept_epochs_and_every_variants_shards(tmp_path):
    # train.keep_epochs adds a final-sized file per kept epoch; shards in variant folders
    # count as on disk, and a (set, checkpoint) whose part folders all exist is not to write.
    cfg = compose_config(["sweep=single", f"root={tmp_path}", "eval.max_images=80"])
    (run,) = expand(cfg)
    (kept,) = expand(compose_config(["sweep=single", f"root={tmp_path}", "train.keep_epochs=[1]"]))
    plain, epochs = disk.run_checkpoints(run.cfg), disk.run_checkpoints(kept.cfg)
    final = disk.formula_bytes(run.cfg, final=True)
    assert epochs.trained - plain.trained == final and epochs.peak - plain.peak == final

    s = V.settings_of(run.cfg.eval)
    eval_dir = run.run_dir / "eval"
    (set_name, role), *rest = layout.eval_sets(run.cfg)
    _, full = disk.run_shards(run.cfg)
    for part in V.parts_of(role, run.cfg.model.name, s):
        folder = eval_dir / V.part_folder(s, "final", role, part, run.cfg.model.name)
        folder.mkdir(parents=True)
        (folder / layout.shard_name(set_name, 0, 80)).write_bytes(b"x" * 100)
    other = eval_dir / "final-attacks-0123456789"  # another variant's: on disk, not this one's
    other.mkdir()
    (other / layout.shard_name(set_name, 0, 80)).write_bytes(b"x" * 50)
    written, todo = disk.run_shards(run.cfg, os.listdir(eval_dir))
    assert written == 100 * len(V.parts_of(role, run.cfg.model.name, s)) + 50
    assert todo == full - disk.set_bytes(run.cfg, set_name, role, []) and rest


def test_a_sweep_above_the_disk_quota_is_refused_naming_the_key(tmp_path):
    est = disk.DiskEstimate(checkpoints=3 * 10**9, shards=4 * 10**8, summaries=10**6, runs=4)
    assert est.total == 3_401_000_000
    disk.check_quota(est, None)
    disk.check_quota(est, 3.5)
    with pytest.raises(ConfigError) as err:
        disk.check_quota(est, 2.5)
    message = str(err.value)
    assert message.startswith("cluster.disk_quota_gb=2.5 ")
    assert "~3.4 GB" in message and "quota of 2.5 GB" in message
    with pytest.raises(ConfigError, match="^my.key=1 "):
        disk.check_quota(est, 1, key="my.key")


def test_the_estimate_and_its_lines_load_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from hpc.cli import compose_config\n"
        "from hpc.sweep import expand, sweep_dir\n"
        "from hpc import disk\n"
        f"cfg = compose_config(['sweep=demo', 'root={tmp_path}'])\n"
        "est = disk.estimate(expand(cfg), sweep_dir(cfg), snapshot_bytes=10**6)\n"
        "print('\\n'.join(est.lines()))\n"
        "heavy = [m for m in ('torch', 'h5py', 'matplotlib', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("disk: ~") and "checkpoints" in first and "code snapshots 1 MB" in first
    assert "4 runs x up to 3 files" in first
    assert second.startswith("disk once trained: ~")


def test_human_sizes():
    assert [human(n) for n in (950, 95_000_000, 1_234_000_000, 380e6)] == [
        "950 B", "95 MB", "1.23 GB", "380 MB",
    ]  # fmt: skip


def _touch(path: Path, age_s: float, now: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("partial")
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_sweep_tmp_removes_only_old_temporary_files_no_job_can_be_writing(tmp_path):
    now = 1_000_000.0
    old, young = 7200, 60
    sweep = tmp_path / "sweep"
    files = {
        "idle run": _touch(sweep / "runs/aaa/checkpoints/.final.pt.k2j4_x9q.tmp", old, now),
        "idle run shard": _touch(sweep / "runs/aaa/eval/.digits__0-5.h5.abcdefgh.tmp", old, now),
        "young": _touch(sweep / "runs/aaa/checkpoints/.step_1.pt.zzzzzzzz.tmp", young, now),
        "busy run": _touch(sweep / "runs/bbb/checkpoints/.final.pt.qwertyui.tmp", old, now),
        "summary": _touch(sweep / "summary/.results.h5.asdfghjk.tmp", old, now),
        "plan": _touch(sweep / ".plan.json.zxcvbnm1.tmp", old, now),
        "code": _touch(sweep / "code/abc/dhm/.x.py.12345678.tmp", old, now),
        "slurm": _touch(sweep / "slurm/.1_0_log.out.12345678.tmp", old, now),
        "not ours": _touch(sweep / "runs/aaa/notes.tmp", old, now),
        "not ours either": _touch(sweep / "runs/aaa/.notes.tmp", old, now),
        "final": _touch(sweep / "runs/aaa/checkpoints/final.pt", old, now),
    }
    link = sweep / "runs/aaa/.link.pt.abcdefgh.tmp"
    link.symlink_to(files["final"])
    os.utime(link, (now - old, now - old), follow_symlinks=False)

    # An aggregate job is running: nothing outside runs/ is touched.
    removed = disk.sweep_tmp(sweep, {"bbb"}, sweep_busy=True, now=now)
    assert sorted(removed) == sorted([files["idle run"], files["idle run shard"]])
    assert files["summary"].exists() and files["plan"].exists()
    assert files["young"].exists() and files["busy run"].exists()
    # Nothing of the sweep's is running any more.
    removed = disk.sweep_tmp(sweep, set(), sweep_busy=False, now=now)
    assert sorted(removed) == sorted([files["busy run"], files["summary"], files["plan"]])
    for kept in ("young", "code", "slurm", "not ours", "not ours either", "final"):
        assert files[kept].exists(), kept
    assert link.is_symlink()
    # Once old enough, the young one goes too.
    assert disk.sweep_tmp(sweep, set(), False, max_age_s=30, now=now) == [files["young"]]
    assert disk.sweep_tmp(tmp_path / "missing", set(), False) == []


def test_the_temporary_name_pattern_is_the_atomic_writers(tmp_path):
    with atomic_path(tmp_path / "final.pt") as tmp:
        assert disk.TMP_RE.match(tmp.name), tmp.name


def test_keeping_step_checkpoints_is_no_part_of_a_run_id():
    cfg = small_config("x")
    kept = small_config("x", **{"train.keep_step_checkpoints": True})
    assert run_id_of(cfg) == run_id_of(kept)


def _whole_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("final/data.pkl", b"x")


def test_step_checkpoints_are_dropped_only_beside_a_whole_final_checkpoint(tmp_path):
    for step in (5, 10):
        _whole_zip(ckpt_io.step_path(tmp_path, step))
    assert ckpt_io.drop_step_checkpoints(tmp_path) == []  # no final.pt: they are the resume
    (tmp_path / "final.pt").write_bytes(b"PK\x03\x04 truncated")
    assert ckpt_io.drop_step_checkpoints(tmp_path) == []
    _whole_zip(tmp_path / "final.pt")
    dropped = ckpt_io.drop_step_checkpoints(tmp_path)
    assert [p.name for p in dropped] == ["step_000000005.pt", "step_000000010.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_a_trained_run_keeps_its_step_checkpoints_only_when_asked(small_cfg, keep):
    four_steps = {"train.epochs": 1, "data.val_size": 959, "train.checkpoint_every_steps": 1}
    cfg = small_cfg(**four_steps, **{"train.keep_step_checkpoints": keep})
    final = train(cfg)
    steps = [step for step, _ in ckpt_io.step_checkpoints(final.parent)]
    assert steps == ([3, 4] if keep else [])
    assert sorted(p.name for p in final.parent.iterdir()) == sorted(
        ["final.pt"] + [ckpt_io.step_path("", s).name for s in steps]
    )
