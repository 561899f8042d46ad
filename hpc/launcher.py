"""Compose the config, validate it, and run what it asks for.

Usage errors (an unknown group option, key or type while composing; a value outside what is
allowed) print one clear line and exit with status 2 before anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dhm.checkpoint import CheckpointError
from dhm.config import ConfigError, RunConfig, check_run
from dhm.data import DataError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
USAGE_ERROR = 2


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed, typed config for command-line overrides (raises Hydra/OmegaConf errors)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def main(cfg: DictConfig) -> int:
    """Validate, then train the configured run in this process."""
    from dhm.train import train

    check_run(cfg)
    final = train(cfg)
    print(f"trained: {final}")
    return 0


def hydra_error_message(err: BaseException) -> str:
    """One line from a Hydra/OmegaConf error and its cause (which names the key and type)."""
    parts = []
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
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(OmegaConf.to_yaml(compose_config([])))
        return 0
    try:
        cfg = compose_config(argv)
        return main(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {hydra_error_message(err)}", file=sys.stderr)
        return USAGE_ERROR
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
