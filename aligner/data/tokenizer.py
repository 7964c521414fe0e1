"""A small, explicit wrapper around a Hugging Face fast tokenizer.

The toolkit needs only a handful of operations (encode without hidden special tokens,
decode without "clean-up", and the eos/bos/pad ids). Wrapping them in one class keeps the
special-token policy in a single place instead of scattered ``add_special_tokens=...``
flags, and works the same for our own trained BPE tokenizer, GPT-2 and SmolLM2.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

# Any one of these makes a directory loadable by transformers.AutoTokenizer.
_TOKENIZER_FILE_SETS = (
    ("tokenizer.json",),
    ("vocab.json", "merges.txt"),  # GPT-2 style byte-level BPE
    ("tokenizer.model",),  # sentencepiece
    ("vocab.txt",),  # WordPiece
)


def _short_listing(names: List[str], limit: int = 8) -> str:
    if not names:
        return "an empty directory"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class Tokenizer:
    """Tokenizer loaded offline from a directory.

    ``encode`` never adds special tokens on its own: callers decide explicitly whether a
    sequence starts with bos (``add_bos``) and whether it ends with eos, because the
    datasets concatenate separately tokenized prompt and answer pieces.
    """

    def __init__(self, hf_tokenizer: Any, name: str = ""):
        self._hf = hf_tokenizer
        self.name = name or getattr(hf_tokenizer, "name_or_path", "") or "<in-memory tokenizer>"
        if self._hf.eos_token_id is None:
            raise ValueError(
                f"tokenizer {self.name} has no eos token; set \"eos_token\" in its "
                "tokenizer_config.json (sequences must end with an eos token for training and generation)"
            )

    @classmethod
    def from_pretrained(cls, path: PathLike) -> "Tokenizer":
        """Load from a local directory (no network access is attempted)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: tokenizer directory not found")
        present = sorted(os.listdir(path))
        if not any(all(name in present for name in names) for names in _TOKENIZER_FILE_SETS):
            expected = " or ".join("+".join(names) for names in _TOKENIZER_FILE_SETS)
            raise FileNotFoundError(
                f"{path}: no tokenizer files (expected {expected}); found {_short_listing(present)}. "
                "Train one with `python -m aligner.data.train_tokenizer` or copy the tokenizer files of a "
                "Hugging Face model here"
            )
        from transformers import AutoTokenizer  # heavy import, only needed when loading

        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
        except Exception as e:  # transformers raises many different types here
            raise ValueError(f"{path}: could not load tokenizer with transformers.AutoTokenizer: {e}") from e
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"{path}: loaded a slow (pure Python) tokenizer; a fast tokenizer (tokenizer.json) is required")
        return cls(hf, name=path)

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying ``transformers`` tokenizer, for code that needs the full HF API."""
        return self._hf

    @property
    def eos_id(self) -> int:
        return int(self._hf.eos_token_id)

    @property
    def bos_id(self) -> Optional[int]:
        bos = self._hf.bos_token_id
        return None if bos is None else int(bos)

    @property
    def pad_id(self) -> int:
        """Padding id; tokenizers without a pad token (GPT-2) pad with eos.

        Padding positions are always masked out, so reusing eos is safe.
        """
        pad = self._hf.pad_token_id
        return self.eos_id if pad is None else int(pad)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, including added special tokens.

        This (not the base ``vocab_size`` of HF tokenizers, which excludes added tokens) is
        the minimum embedding table size of a model using this tokenizer.
        """
        return len(self._hf)

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        """Token ids of ``text``, with the bos id in front if ``add_bos`` and one exists."""
        ids = list(self._hf.encode(text, add_special_tokens=False))
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Token ids of ``text`` (no added special tokens) and each token's ``(start, end)`` characters."""
        enc = self._hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]

    @property
    def chat_template(self) -> Optional[str]:
        """The Jinja chat template shipped with the tokenizer, or None (our byte-level BPE has none)."""
        return getattr(self._hf, "chat_template", None) or None

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """``messages`` (``[{"role", "content"}, ...]``) as text, through the tokenizer's chat template."""
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.name} has no chat template")
        return self._hf.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> List[int]:
        """Token ids of ``render_chat(...)``: the same ids as the HF tokenizer's ``apply_chat_template``.

        The template writes any bos/special tokens itself, so none are added here.
        """
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``.

        Tokenization-space clean-up (which turns ``" ."`` into ``"."``) is disabled so that
        decode(encode(text)) gives back ``text``.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._hf.decode(
            [int(i) for i in ids], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def save(self, directory: PathLike) -> None:
        """Write the tokenizer files so ``Tokenizer.from_pretrained(directory)`` reloads it."""
        os.makedirs(directory, exist_ok=True)
        self._hf.save_pretrained(os.fspath(directory))

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"bos_id={self.bos_id}, pad_id={self.pad_id})"
        )
