"""Every bad input refused: status 2 (usage) or 1 (runtime), one line naming the key or file
and what is allowed, no sbatch call, and no file under root changed.

Each case runs ``python launch.py ...`` as a user would, with Slurm's commands replaced by a
fake (tests/helpers/fake_slurm.py: a two-node partition like the test cluster's) whose sbatch
records every call, and compares a listing of every path and mtime under root before and after.
The table of cases is in docs/reliability.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.datasets import write_cifar10
from tests.helpers.fake_slurm import install as install_fake_slurm

REPO = Path(__file__).resolve().parents[1]
SLURM = [
    "cluster=slurm",
    "cluster.partition=debug",
    "cluster.cpus_per_task=1",
    "cluster.eval_cpus=1",
]
TINY = [
    "sweep=single",
    "model.width=4",
    "model.latent_dim=4",
    "train.epochs=1",
    "train.batch_size=100",
    "eval.batch_size=50",
    "eval.max_images=50",
    "eval.pgd_steps=0",
    "eval.fgsm_eps=[0.0]",
    "eval.iwae_k=[1]",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def fake_slurm(tmp_path_factory):
    return Path(install_fake_slurm(tmp_path_factory.mktemp("fake-slurm-bin")))


def listing(root: Path) -> dict[str, int]:
    """Every file under root and its mtime; the sweep's lock file (hpc.lock: who holds it,
    rewritten by every command that takes it) is coordination, and file_facts.json (hpc.file_facts:
    what was read inside files, by inode; a copied sweep's files are read again) a cache: neither
    is content. A folder counts by its presence (its mtime moves with any entry added or
    removed, which the listing shows itself)."""
    return {
        str(p.relative_to(root)): 0 if p.is_dir() else p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.name not in (".lock", "file_facts.json")
    }


def launch(fake_slurm: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    log = root.parent / "sbatch.log"
    env = {**os.environ, "PATH": f"{fake_slurm}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log)}
    out = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), f"root={root}", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    return out


def refused(fake_slurm: Path, root: Path, args: list[str], status: int, message: str,
            reasons: int = 1) -> str:  # fmt: skip
    """The launch exits ``status`` naming ``message``, in one line, or in one line and then one
    indented line per further reason (``reasons``: a list, such as every missing dataset file);
    nothing under root changes and sbatch is never called."""
    root.mkdir(parents=True, exist_ok=True)
    before = listing(root)
    out = launch(fake_slurm, root, *args)
    err = out.stderr.strip()
    assert out.returncode == status, (args, out.returncode, out.stdout[-2000:], err)
    assert message in err, (args, err)
    lines = err.splitlines()
    assert len(lines) == reasons and err.startswith("error: "), (args, err)
    assert all(line.startswith("  ") for line in lines[1:]), (args, err)
    assert not (root.parent / "sbatch.log").exists(), "sbatch was called"
    assert listing(root) == before, "a file under root changed"
    return err


CASES = [
    # keys, types, group options, Hydra's own settings
    ("unknown key", ["model.no_such_key=1"], 2, "Key 'no_such_key' not in 'ModelConfig'"),
    (
        "unknown key added with +",
        ["+model.no_such_key=1"],
        2,
        "model.no_such_key is not a config key",
    ),
    ("unknown top-level key", ["++nope=1"], 2, "nope is not a config key"),
    ("wrong type", ["model.width=wide"], 2, "model.width"),
    ("unknown group option", ["model=typo"], 2, "Could not find 'model/typo'"),
    ("hydra override", ["hydra.run.dir=x"], 2, "hydra.* settings are not used"),
    ("unknown mode", ["mode=launch"], 2, "mode='launch' is not allowed"),
    # values
    ("negative alpha", [*TINY, "model.alpha=-1"], 2, "model.alpha=-1.0 is not allowed"),
    ("negative beta", [*TINY, "model.beta=-0.5"], 2, "model.beta=-0.5 is not allowed"),
    ("alpha and beta zero", [*TINY, "model.alpha=0", "model.beta=0"], 2, "cannot both be 0"),
    ("split layer 7", [*TINY, "model.vae_split_layer=7"], 2, "model.vae_split_layer=7"),
    ("latent_dim 0", [*TINY, "model.latent_dim=0"], 2, "model.latent_dim=0"),
    ("importance_num 0", [*TINY, "model.importance_num=0"], 2, "model.importance_num=0"),
    ("batch_size 0", [*TINY, "train.batch_size=0"], 2, "train.batch_size=0"),
    ("negative epochs", [*TINY, "train.epochs=-3"], 2, "train.epochs=-3"),
    ("negative epsilon", [*TINY, "eval.fgsm_eps=[-0.1]"], 2, "eval.fgsm_eps=[-0.1]"),
    ("epsilon above 1", [*TINY, "eval.fgsm_eps=[1.5]"], 2, "values in [0, 1] (pixel units)"),
    ("iwae_k [0]", [*TINY, "eval.iwae_k=[0]"], 2, "eval.iwae_k=[0]"),
    (
        "more packed runs than ports",
        [*TINY, "cluster.runs_per_task=40"],
        2,
        "an integer in 1..32, or auto",
    ),
    ("shard not whole blocks", [*TINY, "eval.shard_size=70"], 2, "eval.shard_size=70"),
    (
        "thesis objective with IWAE",
        [*TINY, "model.likelihood=thesis", "model.importance_num=3"],
        2,
        "an IWAE bound needs a likelihood",
    ),
    # cluster profiles, against what sinfo says the partition has
    (
        "contradictory cluster",
        [*TINY, *SLURM, "cluster.gpus_per_node=4", "cluster.tasks_per_node=2"],
        2,
        "must equal gpus_per_node",
    ),
    (
        "time limit forever",
        [*TINY, *SLURM, "cluster.time=forever"],
        2,
        "cluster.time='forever' is not a Slurm time limit",
    ),
    (
        "more nodes than the partition",
        [*TINY, *SLURM, "cluster.nodes=3", "train.batch_size=99"],
        2,
        "cluster.nodes=3 is not allowed: partition debug has 2 node(s)",
    ),
    (
        "more CPUs than a node",
        [*TINY, *SLURM, "cluster.cpus_per_task=8"],
        2,
        "the largest node of partition debug has 2 CPUs",
    ),
    (
        "GPUs the nodes lack",
        [*TINY, *SLURM, "cluster.eval_gpus=4"],
        2,
        "cluster.eval_gpus=4 is not allowed: nodes of partition debug have at most 2 GPU",
    ),
    (
        "a GRES type no node has",
        [*TINY, *SLURM, "cluster.eval_gpus=1", "cluster.gpu_type=h100"],
        2,
        "cluster.gpu_type='h100' is not allowed: no node of partition debug has GPUs of that "
        "type; its GPUs: (untyped)",
    ),
    (
        "an unknown gpu_bind",
        [*TINY, *SLURM, "cluster.gpu_bind=socket"],
        2,
        "cluster.gpu_bind='socket' is not allowed: node or task",
    ),
    ("more memory than a node", [*TINY, *SLURM, "cluster.mem=64G"], 2, "at most 8000 MB"),
    (
        "unknown partition",
        [*TINY, *SLURM, "cluster.partition=gpu"],
        2,
        "gpu is not a partition sinfo knows: debug",
    ),
    # shell syntax wherever a value reaches a script, a job name or a path
    (
        "; in partition",
        [*TINY, *SLURM, "cluster.partition='debug;touch x'"],
        2,
        "cluster.partition='debug;touch x' is not allowed",
    ),
    (
        "$() in account",
        [*TINY, *SLURM, "cluster.account='$(touch x)'"],
        2,
        "cluster.account='$(touch x)' is not allowed",
    ),
    (
        "backticks in extra_sbatch",
        [*TINY, *SLURM, "+cluster.extra_sbatch={comment:'a`b`'}"],
        2,
        "cluster.extra_sbatch.comment",
    ),
    (
        "; in python",
        [*TINY, *SLURM, "cluster.python='python;touch pwned'"],
        2,
        "cluster.python='python;touch pwned' is not allowed",
    ),
    (
        "newline in a setup line",
        [*TINY, *SLURM, "cluster.setup=['echo a\necho b']"],
        2,
        "cluster.setup[0] contains a newline",
    ),
    ("; in sweep.name", [*TINY, "sweep.name='a;b'"], 2, "sweep.name='a;b' is not allowed"),
    ("newline in sweep.name", [*TINY, "sweep.name='a\nb'"], 2, "sweep.name='a\\nb'"),
    (
        "path traversal in sweep.name",
        [*TINY, "sweep.name=../../../x"],
        2,
        "sweep.name='../../../x' is not allowed: one folder name under root",
    ),
    ("$() in root", [*TINY, "root='/tmp/x$(touch y)'"], 2, "root='/tmp/x$(touch y)'"),
    ("backticks in root", [*TINY, "root='/tmp/`id`'"], 2, "root='/tmp/`id`'"),
    # sweeps
    (
        "colliding points",
        ["sweep=single", "sweep.points=[{train.compile:true},{train.compile:false}]"],
        2,
        "train the same model",
    ),
    ("empty grid", ["sweep=single", "sweep.points=[]"], 2, "has an empty grid"),
    ("unknown run id", [*TINY, "runs=[abcdef12]"], 2, "names no run of the 1 in the plan"),
]


@pytest.mark.parametrize("name,args,status,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused(fake_slurm, tmp_path, name, args, status, message):
    # root= given last wins over the fixture's, so a root case tests its own value
    mode = [] if any(a.startswith("mode=") for a in args) else ["mode=run"]
    refused(fake_slurm, tmp_path / "root", [*args, *mode], status, message)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny sweep trained, evaluated and aggregated once (cluster=local): its tests are slow."""
    root = tmp_path_factory.mktemp("trained")
    out = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *TINY, f"root={root}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    (run_dir,) = (root / "single" / "runs").iterdir()
    return root, run_dir


def _copy(trained, tmp_path) -> tuple[Path, Path]:
    root, run_dir = trained
    shutil.copytree(root, tmp_path / "root", copy_function=shutil.copy2)
    return tmp_path / "root", tmp_path / "root" / "single" / "runs" / run_dir.name


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _vae_checkpoint(path: Path) -> None:
    import torch

    from dhm.core.config import run_config, to_yaml

    cfg = run_config(**{"run_dir": "x", "model.name": "vae", "model.alpha": 0.0})
    torch.save({"model": {}, "config_yaml": to_yaml(cfg)}, path)


@pytest.mark.slow
def test_a_truncated_resume_checkpoint_is_named_with_the_way_out(fake_slurm, trained, tmp_path):
    root, run_dir = _copy(trained, tmp_path)
    # A trained run keeps no step checkpoint: final.pt stands in for the newest one.
    (run_dir / "checkpoints" / "final.pt").rename(run_dir / "checkpoints" / "step_000000009.pt")
    for summary_file in (root / "single" / "summary").glob("*"):
        if summary_file.is_file():
            summary_file.unlink()
    steps = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    _truncate(steps[-1])
    err = refused(fake_slurm, root, [*TINY], 1, f"{steps[-1].name} is truncated or corrupt")
    assert "move it aside" in err


def test_warm_starts_that_do_not_load_or_do_not_fit_are_refused(fake_slurm, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(b"PK\x03\x04 not a whole archive")
    refused(
        fake_slurm,
        root,
        [*TINY, f"model.warm_start={bad}", "mode=dry_run"],
        2,
        f"checkpoint {bad} cannot be read",
    )
    vae = tmp_path / "vae.pt"
    _vae_checkpoint(vae)
    refused(
        fake_slurm,
        root,
        [*TINY, f"model.warm_start={vae}"],
        2,
        f"model.warm_start={vae} is a vae checkpoint; a resnet (or dhm) one is needed",
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_a_bad_shard_never_replaces_a_good_summary(fake_slurm, trained, tmp_path, kind):
    import h5py

    root, run_dir = _copy(trained, tmp_path)
    shard = sorted((run_dir / "eval").glob("final-scores-*/digits__*.h5"))[0]
    if kind == "truncated":
        _truncate(shard)
    else:
        shard.unlink()
        with h5py.File(shard, "w") as f:
            f["something/else"] = [1, 2, 3]
    refused(fake_slurm, root, ["sweep.name=single", "mode=aggregate"], 1, shard.name)


def test_dataset_files_are_looked_for_and_read_at_launch(fake_slurm, tmp_path):
    data = tmp_path / "data"
    write_cifar10(data)
    batch = data / "cifar-10-batches-py" / "data_batch_3"
    _truncate(batch)
    root = tmp_path / "root"
    # Every reason at once: the truncated batch, the test batch and both OOD sets (not there)
    err = refused(
        fake_slurm,
        root,
        [*TINY, "data=cifar10", f"data.root={data}", *SLURM, "eval.ood_sets=[cifar100,svhn]"],
        2,
        f"truncated or corrupt file(s) {batch}",
        reasons=4,
    )
    for name in ("CIFAR-10 test set", "CIFAR-100 test set", "SVHN test set"):
        assert f"cannot read the {name}" in err, err
    # A dry run shows its whole plan first, then lists every reason and still exits 2
    nothing = tmp_path / "nothing"
    err = refused(
        fake_slurm,
        root,
        [*TINY, "data=svhn", f"data.root={nothing}", *SLURM, "mode=dry_run",
         "eval.ood_sets=[cifar10]"],
        2,
        "3 dataset problem(s); the plan above is what the launch would do once they are fixed",
        reasons=4,
    )  # fmt: skip
    assert err.count("does not exist") == 3, err
    out = launch(fake_slurm, root, *TINY, "data=svhn", f"data.root={nothing}", *SLURM,
                 "mode=dry_run")  # fmt: skip
    assert "eval svhn: after its training task" in out.stdout, out.stdout
    assert "sbatch call(s)" in out.stdout and "disk: ~" in out.stdout, out.stdout


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    ok = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    return ok


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        if os.geteuid() != 0 or not _mount_tmpfs(path, options):
            if os.environ.get("CI") == "true":
                pytest.fail("could not mount a tmpfs (the test runs as root in CI)")
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_an_unwritable_root_is_refused_before_anything(fake_slurm, tmpfs):
    root = tmpfs("readonly", "ro,size=1m")
    refused(fake_slurm, root, TINY, 2, "is not writable by this user")


def test_a_code_snapshot_that_cannot_be_written_fails_before_any_sbatch(fake_slurm, tmpfs):
    # The snapshot (~0.6 MB) does not fit: the launch stops before its first sbatch call and
    # leaves no partial snapshot behind (hpc.snapshot writes a hidden folder, then renames it).
    root = tmpfs("small", "size=200k")
    out = launch(fake_slurm, root, *TINY, *SLURM)
    assert out.returncode == 1 and "No space left on device" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (root.parent / "sbatch.log").exists(), "sbatch was called"
    code = root / "single" / "code"
    assert not code.exists() or not list(code.iterdir()), list(code.iterdir())


@pytest.mark.slow
def test_a_full_disk_fails_with_a_clear_error_and_no_partial_file(tmpfs):
    root = tmpfs("full", "size=150k")
    out = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *TINY, f"root={root}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 1, out.stdout[-2000:]
    assert "No space left on device" in out.stderr
    names = [p.name for p in root.rglob("*") if p.is_file()]
    assert not [n for n in names if n.endswith(".tmp")], names  # no temporary left behind
    for path in root.rglob("*"):  # and nothing half written under a final name
        if path.suffix == ".pt":
            from dhm.core.checkpoint import looks_complete

            assert looks_complete(path), path
        if path.suffix == ".h5" and path.parent.name == "eval":
            from dhm.evaluation.results import read_shard

            read_shard(path)
