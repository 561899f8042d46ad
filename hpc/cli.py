"""The command line a Hydra user expects, on Hydra's own parser and machinery.

``python launch.py [flags] [overrides]`` takes Hydra's flags, parsed by Hydra's own argument
parser: ``--help`` (config groups and their options), ``--hydra-help``, ``--cfg job|hydra|all``
(with ``--package``, ``--resolve``), ``--info [topic]``, ``-cn/--config-name``,
``-cp/--config-path``, ``-cd/--config-dir``, ``-sc/--shell-completion install=bash`` and
``-m/--multirun``. The show-and-tell flags are Hydra's own code (``Hydra.app_help``,
``show_cfg``, ``show_info``, ``shell_completion``) on a Hydra instance with this project's
search path. A run is composed with the same instance but does not go through ``@hydra.main``:
that would make Hydra create an output folder and logging setup per run, turn ``-m`` into N
separate processes and exit 1 on every error. Instead:

* ``-m key=a,b`` and ``key=range(1,4)`` become sweep dimensions (``sweep.multirun``): one launch,
  one plan, constant sbatch calls; a config group sweep (``-m data=cifar10,svhn``) becomes the
  settings each option changes;
* ``hydra.*`` overrides are refused with a message (runs go to ``root``, not Hydra's run dir);
* usage errors exit with status 2, runtime errors (Slurm, disk) with 1, each as one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra._internal.utils import create_config_search_path, get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from dhm.core.checkpoint import CheckpointError
from dhm.core.config import ConfigError
from dhm.core.datasets import DataError
from hpc.schema import STORED_MODES, register_configs

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
USAGE_ERROR, RUNTIME_ERROR, INTERRUPTED = 2, 1, 130
RUN_SECTIONS = ("model", "data", "train")
SWEEPABLE_GROUPS = ("model", "data", "train")


class UsageError(ValueError):
    """A command line this launcher does not accept; the message says why and what instead."""


def _config_dirs(args: Any) -> tuple[Path, Path | None]:
    """(the primary config folder: configs/ or -cp, the -cd folder or None)."""
    config_dir = CONFIG_DIR
    if args.config_path is not None:
        config_dir = Path(args.config_path)
        if not config_dir.is_absolute():
            config_dir = REPO / config_dir  # as Hydra: relative to the entry point's folder
        if not config_dir.is_dir():
            raise UsageError(f"--config-path {args.config_path}: {config_dir} is not a folder")
    extra = None
    if args.config_dir is not None:
        extra = Path(args.config_dir).resolve()
        if not extra.is_dir():
            raise UsageError(f"--config-dir {args.config_dir}: {extra} is not a folder")
    return config_dir, extra


def _hydra(args: Any) -> Any:
    """A Hydra instance over configs/ (or -cp), with -cd prepended, registered globally."""
    from hydra._internal.hydra import Hydra
    from hydra.core.config_search_path import SearchPathQuery

    register_configs()
    config_dir, extra = _config_dirs(args)
    search_path = create_config_search_path(str(config_dir))
    if extra is not None:
        search_path.prepend("command-line", f"file://{extra}", SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(task_name="launch", config_search_path=search_path)


def compose(hydra: Any, config_name: str, overrides: list[str]) -> DictConfig:
    """The job config (without the ``hydra`` node) for overrides, as Hydra composes it;
    hydra.* overrides (which Hydra lists in the node as it parses them) are refused."""
    cfg = hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN)
    _refuse_hydra_overrides(list(cfg.hydra.overrides.hydra))
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _refuse_hydra_overrides(lines: list[str]) -> None:
    for line in lines:
        raise UsageError(
            f"{line}: hydra.* settings are not used by this launcher (it runs no "
            "Hydra job: runs land in <root>/<sweep.name>/runs/<run_id>, logs beside them). "
            "Set root=... and sweep.name=... instead; --cfg hydra shows Hydra's own config"
        )


def _multirun_dimensions(
    hydra: Any, config_name: str, overrides: list[str]
) -> tuple[list[str], list[list[dict[str, Any]]]]:
    """(the overrides without sweeps, the sweep dimensions): each dimension is a list of point
    dicts, one per value of a swept key or option of a swept config group."""
    parser = OverridesParser.create(config_loader=hydra.config_loader)
    parsed = parser.parse_overrides(overrides)
    _refuse_hydra_overrides([o.input_line for o in parsed if o.is_hydra_override()])
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if not sweeps:
        raise UsageError(
            "-m/--multirun needs a sweep override, e.g. -m model.beta=0.1,1 or "
            "-m train.seed=range(3) (a launch without one is a plain run)"
        )
    base = None
    dims: list[list[dict[str, Any]]] = []
    for o in sweeps:
        key = o.key_or_group
        if o.is_interval_sweep():
            raise UsageError(
                f"{o.input_line}: interval() sweeps need a sampling sweeper; give "
                "values (a,b,c) or range(start,stop,step)"
            )
        group = bool(hydra.config_loader.get_group_options(key))
        if group and key not in SWEEPABLE_GROUPS:
            raise UsageError(
                f"{o.input_line}: one launch has one {key}; sweep the training "
                f"groups ({', '.join(SWEEPABLE_GROUPS)}) or their keys"
            )
        values = [Override._convert_value(v) for v in o.sweep_iterator()]
        if not group:
            if key.split(".")[0] not in RUN_SECTIONS or o.is_delete():
                raise UsageError(
                    f"{o.input_line}: -m sweeps training settings (model.*, data.*, train.*), "
                    "whose values give each run its id; eval settings take lists instead "
                    "(eval.iwae_k=[1,10,100]) and a launch has one cluster, root and mode"
                )
            dims.append([{key: v} for v in values])
            continue
        if base is None:
            base = _run_leaves(compose(hydra, config_name, plain))
        points = []
        for option in values:
            leaves = _run_leaves(compose(hydra, config_name, [*plain, f"{key}={option}"]))
            points.append({k: v for k, v in leaves.items() if base.get(k, _ABSENT) != v})
        dims.append(points)
    return plain, dims


_ABSENT = object()


def _run_leaves(cfg: DictConfig) -> dict[str, Any]:
    """Dotted leaves of the run sections (lists stay whole)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    data = OmegaConf.to_container(cfg, resolve=False)
    for section in RUN_SECTIONS:
        walk(data[section], f"{section}.")
    return out


def compose_launch(hydra: Any, config_name: str, overrides: list[str], multirun: bool):
    """The launch config: Hydra's composition, and with -m the sweep dimensions in it."""
    if not multirun:
        return compose(hydra, config_name, overrides)
    plain, dims = _multirun_dimensions(hydra, config_name, overrides)
    cfg = compose(hydra, config_name, plain)
    cfg.sweep.multirun = [*(cfg.sweep.multirun or []), *dims]
    return cfg


def _error_line(err: BaseException) -> str:
    """One line from a Hydra/OmegaConf error and its cause (which names the key and type)."""
    parts: list[str] = []
    while err is not None and len(parts) < 3:
        for line in str(err).strip().splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if line and not line.startswith(("full_key", "object_type", "provider=")):
                parts.append(line)
        err = err.__cause__
    return " ".join(dict.fromkeys(parts))


def cli(argv: list[str]) -> int:
    """The launcher's command line; returns the exit status."""
    parser = get_args_parser()
    parser.prog = "python launch.py"
    for action in parser._actions:  # Hydra's help texts, for what the flags do here
        if "--multirun" in action.option_strings:
            action.help = "turn comma lists and range() into sweep axes: one launch, one plan"
        elif "--run" in action.option_strings:
            action.help = "run (the default)"
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed the usage error, or --version
        return int(exit_.code or 0)
    config_name = args.config_name or "config"
    try:
        shows = sum([args.cfg is not None, args.info is not None, bool(args.shell_completion)])
        if shows + bool(args.multirun) > 1:
            raise UsageError("use only one of --cfg, --info, --shell-completion and --multirun")
        launch = not (shows or args.help or args.hydra_help or args.resolve)
        if launch and args.experimental_rerun is None:
            cfg = _composed(args, config_name)
            # Each command loads what it needs: status, cancel and report no planning or
            # submission code (submitit among it).
            if cfg.mode in STORED_MODES:
                from hpc.stored import main
            else:
                from hpc.launcher import main
            return main(cfg, argv)
        hydra = _hydra(args)
        if args.help:
            hydra.app_help(config_name=config_name, args_parser=parser, args=args)
            return 0
        if args.hydra_help:
            hydra.hydra_help(config_name=config_name, args_parser=parser, args=args)
            return 0
        if args.resolve and args.cfg is None:
            raise UsageError("--resolve works with --cfg or --help only")
        if args.cfg is not None:
            hydra.show_cfg(config_name, args.overrides, args.cfg, args.package, args.resolve)
            return 0
        if args.info is not None:
            hydra.show_info(args.info, config_name=config_name, overrides=args.overrides)
            return 0
        if args.shell_completion:
            hydra.shell_completion(config_name=config_name, overrides=args.overrides)
            return 0
        raise UsageError("--experimental-rerun is not supported: relaunch with the overrides")
    except (HydraException, OmegaConfBaseException) as err:
        return _report(_error_line(err), USAGE_ERROR)
    except (UsageError, ConfigError, DataError, CheckpointError) as err:
        return _report(str(err), USAGE_ERROR)
    except RuntimeError as err:  # SlurmError, IncompleteSweepError, SummaryKeptError, ...
        return _report(str(err), RUNTIME_ERROR)
    except OSError as err:  # an unwritable root, a full disk
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return _report(f"{err.strerror or err}{where}", RUNTIME_ERROR)
    except KeyboardInterrupt:  # Ctrl-C outside submission (which cancels what it submitted)
        return _report("interrupted (Ctrl-C)", INTERRUPTED)
    finally:
        GlobalHydra.instance().clear()


def _composed(args: Any, config_name: str) -> DictConfig:
    """The launch config of a command line, composed by Hydra."""
    return compose_launch(_hydra(args), config_name, list(args.overrides), args.multirun)


def _report(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    if os.environ.get("DHM_TRACEBACK"):
        import traceback

        traceback.print_exc()
    return status


def compose_config(overrides: list[str], multirun: bool = False, config_name: str = "config"):
    """The launch config for command-line overrides, as ``cli`` composes it (tests, benchmarks).
    Raises what Hydra, OmegaConf or the -m conversion raise."""
    hydra = _hydra(get_args_parser().parse_args([]))
    try:
        return compose_launch(hydra, config_name, list(overrides), multirun)
    finally:
        GlobalHydra.instance().clear()
