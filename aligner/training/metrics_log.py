"""Metrics to Lightning's loggers (CSV, TensorBoard, W&B offline) from rank 0, plus
`metrics.jsonl`: one append-only record per log call that survives resumes (entries past the
resumed step, written after the last checkpoint, are dropped), so a resumed run plots and
reports its whole history."""
from __future__ import annotations

import json
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
                 wandb: bool = False, wandb_kwargs: Mapping[str, Any] | None = None, hparams: Mapping | None = None,
                 start_step: int = 0):
        self.log_dir = Path(log_dir)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._loggers = []
        self._journal = None
        if not _is_rank_zero():
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._open_journal(start_step)
        from pytorch_lightning import loggers as pl_loggers

        # Each (re)start writes its own version so a resume never clobbers earlier files.
        version = "" if start_step == 0 else f"resumed_at_step_{start_step}"
        if csv:
            self._loggers.append(pl_loggers.CSVLogger(save_dir=str(self.log_dir), name="csv", version=version))
        if tensorboard:
            try:
                self._loggers.append(pl_loggers.TensorBoardLogger(save_dir=str(self.log_dir), name="tensorboard",
                                                                  version=version, default_hp_metric=False))
            except ModuleNotFoundError as exc:  # tensorboard is a dependency, but be explicit if absent
                log.warning("TensorBoard logging disabled (%s); set exp_manager.create_tensorboard_logger=False", exc)
        if wandb:
            os.environ.setdefault("WANDB_MODE", "offline")
            # null or empty (e.g. name=${NAME} with NAME unset in a shell script): WandbLogger's default
            kwargs = {k: v for k, v in (wandb_kwargs or {}).items() if v is not None and v != ""}
            kwargs.setdefault("offline", True)
            kwargs.setdefault("save_dir", str(self.log_dir))
            self._loggers.append(pl_loggers.WandbLogger(**kwargs))
        if hparams:
            for logger in self._loggers:
                try:
                    logger.log_hyperparams(dict(hparams))
                except Exception as exc:  # hparams are a nicety; never fail a run on them
                    log.debug("could not log hyperparameters to %s: %s", type(logger).__name__, exc)

    def _open_journal(self, start_step: int) -> None:
        path = self.log_dir / "metrics.jsonl"
        kept = []
        if path.is_file() and start_step > 0:
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if record.get("step", 0) <= start_step:
                    kept.append(record)
        with open(path, "w") as handle:
            for record in kept:
                handle.write(json.dumps(record) + "\n")
                for key, value in record.items():
                    if key != "step":
                        self.history[key].append((int(record["step"]), float(value)))
        self._journal = open(path, "a", buffering=1)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not _is_rank_zero():
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
        for key, value in clean.items():
            self.history[key].append((step, value))
        self._journal.write(json.dumps({"step": step, **clean}) + "\n")
        for logger in self._loggers:
            logger.log_metrics(clean, step=step)

    def close(self) -> None:
        if not _is_rank_zero():
            return
        if self._journal is not None:
            self._journal.close()
        for logger in self._loggers:
            logger.save()
            logger.finalize("success")
