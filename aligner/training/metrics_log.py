"""Metrics to Lightning's loggers (CSV, TensorBoard, W&B offline) from rank 0, plus a history
kept in memory so a finished run can plot its curves."""
from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import torch.distributed as dist

log = logging.getLogger("aligner.metrics")


def _is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class MetricsLogger:
    """`log(step, {"train/loss": 1.2, ...})` fans out to every configured Lightning logger."""

    def __init__(self, log_dir: str | os.PathLike, name: str, csv: bool = True, tensorboard: bool = True,
                 wandb: bool = False, wandb_kwargs: Mapping[str, Any] | None = None, hparams: Mapping | None = None):
        self.log_dir = Path(log_dir)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._loggers = []
        if not _is_rank_zero():
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        from pytorch_lightning import loggers as pl_loggers

        if csv:
            self._loggers.append(pl_loggers.CSVLogger(save_dir=str(self.log_dir), name="csv", version=""))
        if tensorboard:
            try:
                self._loggers.append(pl_loggers.TensorBoardLogger(save_dir=str(self.log_dir), name="tensorboard",
                                                                  version="", default_hp_metric=False))
            except ModuleNotFoundError as exc:  # tensorboard is a dependency, but be explicit if absent
                log.warning("TensorBoard logging disabled (%s); set exp_manager.create_tensorboard_logger=False", exc)
        if wandb:
            os.environ.setdefault("WANDB_MODE", "offline")
            kwargs = dict(wandb_kwargs or {})
            kwargs.setdefault("offline", True)
            kwargs.setdefault("save_dir", str(self.log_dir))
            self._loggers.append(pl_loggers.WandbLogger(**kwargs))
        if hparams:
            for logger in self._loggers:
                try:
                    logger.log_hyperparams(dict(hparams))
                except Exception as exc:  # hparams are a nicety; never fail a run on them
                    log.debug("could not log hyperparameters to %s: %s", type(logger).__name__, exc)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not _is_rank_zero():
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
        for key, value in clean.items():
            self.history[key].append((step, value))
        for logger in self._loggers:
            logger.log_metrics(clean, step=step)

    def close(self) -> None:
        if not _is_rank_zero():
            return
        for logger in self._loggers:
            logger.save()
            logger.finalize("success")
