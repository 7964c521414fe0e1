"""Hydra entry points for the example scripts, so each script is three lines."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import hydra

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def hydra_entry(config_name: str, train: Callable) -> Callable[[], None]:
    """`train(cfg, schema_path)` behind @hydra.main with conf/<config_name>.yaml."""

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)
    def main(cfg) -> None:
        import logging

        logging.getLogger("megatron").setLevel(logging.WARNING)  # its import-time INFO chatter
        train(cfg, CONF_DIR / f"{config_name}.yaml")

    return main
