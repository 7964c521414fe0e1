"""How to sample a response: NeMo-Aligner's `sampling_params` + `length_params`, validated once.

The PPO config spells these as `model.ppo.sampling_params.*` and `model.ppo.length_params.*`;
every validation error names that key so a bad YAML value is found without reading code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

SAMPLING_KEY = "model.ppo.sampling_params"
LENGTH_KEY = "model.ppo.length_params"

# NeMo-Aligner's sampling_params block carries keys that only matter to its Megatron text
# generation server (BOS handling, returning full distributions). They are accepted so a
# NeMo-Aligner YAML loads unchanged, and ignored because this sampler never needs them.
_IGNORED_SAMPLING_KEYS = frozenset({"add_BOS", "all_probs", "compute_logprob"})


class SamplingParamsError(ValueError):
    """A sampling or length parameter has a value the sampler cannot use."""


@dataclass(frozen=True)
class SamplingParams:
    """One generation request's settings.

    temperature: logits are divided by it before filtering and sampling (ignored when greedy).
    top_k: keep only the k most likely tokens; 0 disables.
    top_p: nucleus sampling, keep the smallest most-likely set with mass >= top_p; 1.0 disables.
    greedy: take the argmax instead of sampling.
    min_length: the end-of-sequence token is forbidden while fewer than this many tokens have
        been generated (NeMo-Aligner's default is 1: no empty responses).
    max_length: the most tokens generated per row (the response budget, not prompt + response).
    end_strings: a row also stops when its decoded response ends with one of these.
    seed: seeds the sampling generator; the same seed and inputs give the same samples.
        None draws a fresh seed from the OS. Ignored by our sampler when the caller gives
        per-row stream keys (the rollout engine always does: keyed by global prompt index, so
        rollouts do not depend on the data-parallel rank or the micro-batching).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    min_length: int = 1
    max_length: int = 256
    end_strings: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self):
        def bad(key: str, message: str):
            raise SamplingParamsError(f"{key}: {message}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not isinstance(self.greedy, bool):
            bad(f"{SAMPLING_KEY}.greedy", f"must be true or false, got {self.greedy!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            bad(f"{SAMPLING_KEY}.temperature",
                f"must be a number > 0, got {self.temperature!r} (for argmax decoding set greedy=true)")
        if not is_int(self.top_k) or self.top_k < 0:
            bad(f"{SAMPLING_KEY}.top_k", f"must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                or not 0.0 < self.top_p <= 1.0:
            bad(f"{SAMPLING_KEY}.top_p", f"must be in (0, 1] (1.0 disables it), got {self.top_p!r}")
        if isinstance(self.end_strings, str):
            bad(f"{SAMPLING_KEY}.end_strings", f"must be a list of strings, got the string {self.end_strings!r}")
        end_strings = tuple(self.end_strings or ())
        for item in end_strings:
            if not isinstance(item, str) or not item:
                bad(f"{SAMPLING_KEY}.end_strings", f"every entry must be a non-empty string, got {item!r}")
        object.__setattr__(self, "end_strings", end_strings)
        if not is_int(self.max_length) or self.max_length < 1:
            bad(f"{LENGTH_KEY}.max_length", f"must be an integer >= 1, got {self.max_length!r}")
        if not is_int(self.min_length) or self.min_length < 0:
            bad(f"{LENGTH_KEY}.min_length", f"must be an integer >= 0, got {self.min_length!r}")
        if self.min_length > self.max_length:
            bad(f"{LENGTH_KEY}.min_length",
                f"{self.min_length} exceeds {LENGTH_KEY}.max_length={self.max_length}")
        if self.seed is not None and not is_int(self.seed):
            bad(f"{SAMPLING_KEY}.seed", f"must be an integer or null, got {self.seed!r}")

    @classmethod
    def from_config(cls, sampling_params_cfg: Mapping[str, Any] | None,
                    length_params_cfg: Mapping[str, Any] | None, seed: int | None = None) -> "SamplingParams":
        """Build from the two YAML blocks (dicts or OmegaConf nodes).

        NeMo-Aligner calls the greedy flag `use_greedy`; `greedy` is accepted too. A `seed`
        key in sampling_params wins over the `seed` argument.
        """
        sampling = dict(sampling_params_cfg or {})
        length = dict(length_params_cfg or {})
        values: dict[str, Any] = {"seed": seed}

        if "greedy" in sampling and "use_greedy" in sampling:
            raise SamplingParamsError(f"{SAMPLING_KEY}: set only one of greedy / use_greedy")
        if "use_greedy" in sampling:
            values["greedy"] = sampling.pop("use_greedy")
        repetition_penalty = sampling.pop("repetition_penalty", 1.0)
        if repetition_penalty != 1.0:
            raise SamplingParamsError(
                f"{SAMPLING_KEY}.repetition_penalty={repetition_penalty!r} is not supported; set it to 1.0")
        known = {"greedy", "temperature", "top_k", "top_p", "end_strings", "seed"}
        for key, value in sampling.items():
            if key in _IGNORED_SAMPLING_KEYS:
                continue
            if key not in known:
                raise SamplingParamsError(
                    f"{SAMPLING_KEY}.{key}: unknown key; known keys: {sorted(known | {'use_greedy'})}")
            values[key] = value
        for key, value in length.items():
            if key not in ("max_length", "min_length"):
                raise SamplingParamsError(f"{LENGTH_KEY}.{key}: unknown key; known keys: max_length, min_length")
            values[key] = value
        if "end_strings" in values and values["end_strings"] is not None \
                and not isinstance(values["end_strings"], str):
            values["end_strings"] = tuple(values["end_strings"])  # OmegaConf ListConfig -> tuple
        return cls(**values)
