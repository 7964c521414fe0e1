"""Hydra entry points for the example scripts, so each script is three lines."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import hydra
from omegaconf import DictConfig, OmegaConf

from aligner.training import nemo_compat
from aligner.training.config_check import ConfigError, check_config

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def prepare_config(cfg: DictConfig, schema_path: str | Path) -> None:
    """What every entry does to the composed config before a trainer sees it, in place: the schema
    check (unknown keys, wrong types), then NeMo-Aligner spellings rewritten into ours
    (`nemo_compat`: e.g. model.data.data_prefix -> model.data.{train_ds,validation_ds}.file_path)."""
    defaults = OmegaConf.load(schema_path)
    check_config(cfg, defaults, source=str(schema_path))
    nemo_compat.resolve(cfg, defaults)


def check_logger_packages(cfg: DictConfig) -> None:
    """Fail at start-up, not after the model is built, when a requested logger cannot be made."""
    if OmegaConf.select(cfg, "exp_manager.create_wandb_logger"):
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("exp_manager.create_wandb_logger=True needs the wandb package "
                              "(pip install -e '.[wandb]'; it logs offline), or set exp_manager.create_wandb_logger=False")


def _resolve_callable(train: Callable | str) -> Callable:
    if callable(train):
        return train
    module, _, name = train.partition(":")
    return getattr(importlib.import_module(module), name)


def hydra_entry(config_name: str, train: Callable | str) -> Callable[[], None]:
    """`train(cfg, schema_path)` behind @hydra.main with conf/<config_name>.yaml. `train` may be
    "module:function", imported only when the job runs, so `--help` and `--cfg job` answer
    without loading torch and megatron."""

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)
    def main(cfg) -> None:
        import logging

        schema = CONF_DIR / f"{config_name}.yaml"
        prepare_config(cfg, schema)
        check_logger_packages(cfg)
        logging.getLogger("megatron").setLevel(logging.WARNING)  # its import-time INFO chatter
        _resolve_callable(train)(cfg, schema)

    return main
