"""NeMo-Aligner spellings of our config keys, resolved once before any trainer reads the config.

NeMo-Aligner's tutorials name a few settings differently from our YAMLs (or add keys that only
make sense on its stack). Rather than teach every trainer both spellings, `resolve` rewrites the
composed config in place, so trainers only ever read our keys:

* ``model.data.data_prefix={train: [F], validation: [G], test: [H]}`` sets
  ``model.data.train_ds.file_path=F`` and ``model.data.validation_ds.file_path=G``. One file per
  split: NeMo's lists of several files (or blended ``[weight, file, ...]`` lists) are refused, as
  is a plain string (NeMo splits that one file by ``splits_string``; we do not). ``test`` is
  accepted and ignored: NeMo-Aligner does not evaluate it either. A split given both here and in
  ``train_ds``/``validation_ds.file_path`` (changed from the YAML default) must name the same file.
* ``model.data.data_impl``: only ``jsonl`` (or ``json``); our readers read JSON lines.
* ``model.ppo.combine_rm_and_critic_server`` (PPO actor; NeMo-Aligner itself ignores it) sets
  ``remote_critic_rm.combine_rm_and_critic_server``, the key the actor reads.
* ``model.mcore_gpt=false`` and ``model.megatron_amp_O2=false`` with bf16 ask for what is not
  implemented (NeMo's legacy model; O1 autocast) and are refused.
* ``model.activations_checkpoint_{granularity,method}`` are checked for typos and not applied:
  recomputing activations saves memory and does not change results.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from aligner.training.config_check import ConfigError

log = logging.getLogger("aligner.config")

# data_prefix split -> our dataset key under model.data
SPLITS = {"train": "train_ds", "validation": "validation_ds"}
IGNORED_SPLITS = ("test",)
DATA_IMPLS = ("jsonl", "json")
CHECKPOINT_GRANULARITIES = (None, "selective", "full")
CHECKPOINT_METHODS = (None, "uniform", "block")


def resolve(cfg: DictConfig, defaults: DictConfig) -> None:
    """Rewrite NeMo spellings in `cfg` (composed, schema-checked) into ours; `defaults` is the YAML
    the config came from (a key still equal to its default counts as not given)."""
    _data_prefix(cfg, defaults)
    _data_impl(cfg)
    _combine_rm_and_critic_server(cfg, defaults)
    _model_flags(cfg)


def data_prefix_files(prefix: Any) -> dict[str, str]:
    """`model.data.data_prefix` -> {"train": file, "validation": file} (splits given only)."""
    if prefix is None:
        return {}
    if isinstance(prefix, str):
        raise ConfigError(
            f"model.data.data_prefix={prefix!r} is a single path (in NeMo, one dataset split into train/"
            f"validation/test by model.data.splits_string, which is not supported): give "
            f"model.data.data_prefix={{train: [FILE], validation: [FILE]}} or model.data.train_ds.file_path")
    if isinstance(prefix, (list, tuple, ListConfig)):
        raise ConfigError(
            "model.data.data_prefix is a list (NeMo's blended [weight, file, ...] form, which is not supported): "
            "give model.data.data_prefix={train: [FILE], validation: [FILE]}")
    if not isinstance(prefix, (dict, DictConfig)):
        raise ConfigError(f"model.data.data_prefix: expected {{train: [FILE], validation: [FILE]}}, got {prefix!r}")
    unknown = sorted(str(k) for k in prefix if k not in SPLITS and k not in IGNORED_SPLITS)
    if unknown:
        raise ConfigError(f"model.data.data_prefix: unknown split(s) {unknown}; expected train, validation, test")
    files = {}
    for split in SPLITS:
        file = _one_file(split, prefix.get(split))
        if file is not None:
            files[split] = file
    for split in IGNORED_SPLITS:
        _one_file(split, prefix.get(split))  # still a typo check
    return files


def _one_file(split: str, value: Any) -> str | None:
    key = f"model.data.data_prefix.{split}"
    if value is None:
        return None
    if isinstance(value, (list, tuple, ListConfig)):
        items = list(value)
        if not items:
            return None
        if len(items) > 1:
            raise ConfigError(f"{key} lists {len(items)} entries {items}: only one file per split is supported "
                              f"(concatenate the files into one JSONL file)")
        value = items[0]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a file path, got {value!r}")
    return value


def _same_file(a: str, b: str) -> bool:
    def norm(p: str) -> str:
        return os.path.normpath(os.path.abspath(os.path.expanduser(p)))

    return norm(a) == norm(b)


def _data_prefix(cfg: DictConfig, defaults: DictConfig) -> None:
    files = data_prefix_files(OmegaConf.select(cfg, "model.data.data_prefix"))
    for split, file in files.items():
        ds = SPLITS[split]
        key = f"model.data.{ds}.file_path"
        if OmegaConf.select(cfg, f"model.data.{ds}") is None:
            raise ConfigError(f"model.data.data_prefix.{split}: this script reads no {key}")
        current = OmegaConf.select(cfg, key)
        default = OmegaConf.select(defaults, key)
        if current is not None and current != default and not _same_file(str(current), file):
            raise ConfigError(f"model.data.data_prefix.{split} ({file}) and {key} ({current}) name different "
                              f"files: give one of them")
        cfg.model.data[ds].file_path = file


def _data_impl(cfg: DictConfig) -> None:
    impl = OmegaConf.select(cfg, "model.data.data_impl")
    if impl is not None and str(impl).lower() not in DATA_IMPLS:
        raise ConfigError(f"model.data.data_impl={impl}: only jsonl files are read (NeMo's indexed/mmap "
                          f"formats are not supported); convert the data to JSON lines")


def _combine_rm_and_critic_server(cfg: DictConfig, defaults: DictConfig) -> None:
    alias = OmegaConf.select(cfg, "model.ppo.combine_rm_and_critic_server")
    if alias is None or OmegaConf.select(cfg, "remote_critic_rm") is None:
        return
    key = "remote_critic_rm.combine_rm_and_critic_server"
    current = OmegaConf.select(cfg, key)
    if current != OmegaConf.select(defaults, key) and bool(current) != bool(alias):
        raise ConfigError(f"model.ppo.combine_rm_and_critic_server={alias} and {key}={current} disagree: "
                          f"give one of them ({key} is the one the actor reads)")
    cfg.remote_critic_rm.combine_rm_and_critic_server = bool(alias)


def _model_flags(cfg: DictConfig) -> None:
    if OmegaConf.select(cfg, "model.mcore_gpt") is False:
        raise ConfigError("model.mcore_gpt=False asks for NeMo's legacy GPT model; only the megatron-core "
                          "GPTModel is implemented: drop the override or set model.mcore_gpt=True")
    if OmegaConf.select(cfg, "model.megatron_amp_O2") is False and OmegaConf.select(cfg, "trainer.precision"):
        from aligner.models.config import parse_precision
        import torch

        if parse_precision(cfg.trainer.precision) != torch.float32:
            raise ConfigError(
                f"model.megatron_amp_O2=False (fp32 weights under autocast) is not implemented: with "
                f"trainer.precision={cfg.trainer.precision} the weights are half precision and the optimizer "
                f"keeps fp32 main params (NeMo's O2); set model.megatron_amp_O2=True or trainer.precision=fp32")
    for name, allowed in (("granularity", CHECKPOINT_GRANULARITIES), ("method", CHECKPOINT_METHODS)):
        key = f"model.activations_checkpoint_{name}"
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value}: expected one of {[v for v in allowed if v]} or null")
        if value is not None and os.environ.get("RANK", "0") == "0":
            log.warning("%s=%s is accepted but not applied: activations are kept, not recomputed "
                        "(memory only; results are the same)", key, value)
