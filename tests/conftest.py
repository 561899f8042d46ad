"""Shared fixtures: small configs built from the real schemas (tests/helpers/configs.py)."""

from __future__ import annotations

import pytest

from tests.helpers.configs import small_config


@pytest.fixture
def small_cfg(tmp_path):
    """A factory of small RunConfigs (``small_config``) whose run_dir is ``tmp_path/run``."""

    def make(**overrides):
        return small_config(tmp_path / "run", **overrides)

    return make
