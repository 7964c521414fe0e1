"""Check a composed Hydra config against the YAML it came from: unknown keys and wrong types.

Hydra already refuses `key=value` for keys that do not exist; `+key=value` slips through, and
neither catches `model.optim.lr=abc`. The YAML defaults double as the schema: each leaf's default
value gives its type, and `null` defaults accept anything. A mapping whose default is `{}`, or
one listed in OPEN_MAPPINGS, is open: keys beyond its defaults are allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


# Mappings handed on whole as keyword arguments to a library, so any key it takes is allowed
# (their listed keys are still type-checked).
OPEN_MAPPINGS = frozenset({"exp_manager.wandb_logger_kwargs"})  # -> Lightning's WandbLogger(**kwargs)


class ConfigError(ValueError):
    pass


def _type_name(value: Any) -> str:
    return type(value).__name__


def _leaf_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return True


def check_config(cfg: DictConfig, defaults: DictConfig | str | Path, source: str = "") -> None:
    """Raise ConfigError naming every offending key (full dotted path) and the defaults file."""
    if not isinstance(defaults, DictConfig):
        source = source or str(defaults)
        defaults = OmegaConf.load(defaults)
    problems: list[str] = []
    _walk(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(defaults, resolve=False), "", problems)
    if problems:
        where = f" (schema: {source})" if source else ""
        raise ConfigError("invalid configuration" + where + ":\n  " + "\n  ".join(problems))


def _walk(value: Any, default: Any, path: str, problems: list[str]) -> None:
    if isinstance(default, dict):
        if value is None:
            return
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_type_name(value)} {value!r}")
            return
        if not default:  # open mapping
            return
        for key, sub in value.items():
            full = f"{path}.{key}" if path else str(key)
            if key == "hydra":
                continue
            if key not in default:
                if path in OPEN_MAPPINGS:
                    continue
                close = [k for k in default if k.lower().startswith(str(key).lower()[:3])]
                hint = f"; did you mean {close}?" if close else ""
                problems.append(f"{full}: unknown key{hint}")
                continue
            _walk(sub, default[key], full, problems)
        return
    if isinstance(default, list):
        if value is not None and not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {_type_name(value)} {value!r}")
        return
    if not _leaf_ok(default, value):
        problems.append(f"{path}: expected {_type_name(default)} (like the default {default!r}), "
                        f"got {_type_name(value)} {value!r}")


def to_plain(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)
