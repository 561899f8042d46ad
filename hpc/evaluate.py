"""Evaluation variants at launch: the variant a launch evaluates (``resolve``), and
``mode=evaluate``, which evaluates a stored sweep's trained checkpoints again without training.

    python launch.py sweep.name=alpha_beta mode=evaluate eval.pgd_steps=50
    python launch.py sweep.name=alpha_beta mode=evaluate eval.variant=pgd50 eval.pgd_steps=50
    python launch.py sweep.name=alpha_beta mode=evaluate eval.checkpoints=[50,final]
    python launch.py sweep.name=alpha_beta mode=evaluate eval.variant=pgd50   # runs lacking it

A variant is the sweep's default (its first) with the ``eval.*`` settings of the command line
applied; ``eval.variant`` names it (new) or picks a recorded one. Only the parts of each set
that no variant has computed are submitted (``dhm.core.variants``); nothing is moved or removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dhm.core import variants as V
from dhm.core.config import ConfigError, Plain
from hpc.sweep import Run

TRAINING = ("model", "data", "train")  # sections and groups a stored run keeps
OPERATIONAL = ("data.root", "data.download")  # where the data is: may change between launches
GRID = ("sweep.axes", "sweep.points", "sweep.seeds", "sweep.multirun")


def _key(arg: str) -> str:
    return arg.lstrip("+~").split("=", 1)[0]


def refuse_training_overrides(argv: list[str]) -> None:
    """ConfigError for a command-line override of a training setting (mode=evaluate)."""
    for arg in argv:
        key = _key(arg)
        if "=" not in arg or key in OPERATIONAL:
            continue
        if key.split(".")[0] in TRAINING or key.startswith(GRID):
            raise ConfigError(
                f"mode=evaluate: {arg} is not allowed: {key} is a training setting, and "
                "mode=evaluate evaluates the checkpoints the sweep trained with its stored "
                "settings (plan.json). Give eval.* settings only (and runs=, where=, cluster.*); "
                "train with a launch (mode=run)"
            )


def _given(argv: list[str]) -> list[str]:
    """The variant settings given on the command line (``eval.<setting>=...``)."""
    keys = [_key(a)[len("eval.") :] for a in argv if "=" in a and _key(a).startswith("eval.")]
    return [k.split(".")[0] for k in keys if k.split(".")[0] in V.SETTINGS]


def _listing(variants: list[V.Variant]) -> str:
    base = variants[0] if variants else None
    return (
        "; ".join(f"{v.name} ({v.describe(None if v is base else base)})" for v in variants)
        or "none yet"
    )


def resolve(cfg: Any, registry: list[V.Variant], argv: list[str]) -> tuple[V.Variant, bool]:
    """(the variant this launch evaluates, whether it is new). mode=evaluate: the default (or
    the named variant) with the command line's eval settings; a launch: its eval settings.
    ConfigError for a name that is taken by other settings, or unknown while the settings are
    another variant's."""
    name = cfg.eval.variant
    known = {v.name: v for v in registry}
    if cfg.mode == "evaluate" and registry:
        base = known.get(name, registry[0])
        settings = dict(base.settings)
        mine = V.settings_of(cfg.eval)
        settings.update({k: mine[k] for k in _given(argv)})
    else:
        settings = V.settings_of(cfg.eval)
    same = next((v for v in registry if v.settings == settings), None)
    if name is None:
        if same is not None:
            return same, False
        if not registry:
            return V.Variant(V.DEFAULT, settings), True
        return V.Variant(V.auto_name(settings, registry[0]), settings), True
    if name in known:
        if known[name].settings != settings:
            raise ConfigError(
                f"eval.variant={name} is not allowed: the sweep's variant {name} has other "
                f"settings ({known[name].describe(V.Variant('', settings))} there); give a new "
                f"name for these. Variants: {_listing(registry)}"
            )
        return known[name], False
    if same is not None:
        raise ConfigError(
            f"eval.variant={name} is not a variant of this sweep: its variants are "
            f"{_listing(registry)}. To define {name}, change an eval setting (e.g. "
            f"eval.pgd_steps=50); these settings are variant {same.name}'s"
        )
    return V.Variant(str(name), settings), True


def with_variant(runs: list[Run], variant: V.Variant, device: str) -> list[Run]:
    """The stored runs with the variant's eval settings (and this launch's eval.device)."""
    out = []
    for run in runs:
        data = run.cfg.plain() if hasattr(run.cfg, "plain") else dict(run.cfg)
        data = {**data, "eval": {**data["eval"], **variant.settings, "variant": variant.name,
                                 "device": device}}  # fmt: skip
        out.append(Run(run.run_id, run.overrides, Plain.of(data)))
    return out


def check_checkpoints(runs: list[Run], variant: V.Variant) -> None:
    """ConfigError naming the first run that did not keep (or cannot reach) an epoch the
    variant evaluates: one not in its train.keep_epochs or past train.epochs, or a trained
    run's epoch file that is not there."""
    epochs = [c for c in variant.settings["checkpoints"] if c != V.FINAL]
    for run in runs:
        kept = sorted(int(e) for e in run.cfg.train.get("keep_epochs", []))
        trained = (run.run_dir / "checkpoints" / "final.pt").exists()
        for epoch in epochs:
            path = run.run_dir / "checkpoints" / V.checkpoint_file(epoch)
            missing = epoch not in kept or epoch > run.cfg.train.epochs
            if missing or (trained and not path.exists()):
                folder = run.run_dir / "checkpoints"
                have = [
                    str(e) for e in kept if not trained or (folder / V.checkpoint_file(e)).exists()
                ]
                raise ConfigError(
                    f"eval.checkpoints={_text(variant.settings['checkpoints'])} is not allowed: "
                    f"run {run.run_id} did not keep epoch {epoch} (it trained "
                    f"{run.cfg.train.epochs} epochs with train.keep_epochs={kept}; it has "
                    f"{', '.join([*have, 'final'])})"
                )


def _text(values: list[Any]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def launch_variant(cfg: DictConfig, sweep: Path, argv: list[str]) -> tuple[V.Variant, bool]:
    """The variant of a launch, given to its config (``cfg.eval.variant``)."""
    variant, new = resolve(cfg, V.read_registry(sweep), argv)
    cfg.eval.variant = variant.name
    return variant, new


def register(sweep: Path, variant: V.Variant) -> None:
    """Record a new variant in <sweep>/variants.json (with the default, for an old sweep)."""
    registry = V.read_registry(sweep)
    if variant.name not in {v.name for v in registry}:
        V.write_registry(sweep, [*registry, variant])
    elif not (sweep / V.REGISTRY).exists():
        V.write_registry(sweep, registry)
