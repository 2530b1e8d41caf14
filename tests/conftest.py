"""Shared test helpers: compose the real Hydra config and shrink it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jactus.utils.run import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def compose(overrides: list[str], config_name: str = "train", output_dir: Path | None = None):
    """Compose `conf/<config_name>.yaml` with overrides, with Hydra's runtime config set (as the CLI does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path):
    """`compose_cfg(overrides)` -> the composed config, logging under tmp_path (a fixture: tests import nothing)."""

    def make(overrides: list[str], config_name: str = "train", output_dir: Path | None = None):
        return compose(overrides + [f"paths.log_dir={tmp_path}/logs"], config_name,
                       output_dir=output_dir or tmp_path / "run")

    return make
