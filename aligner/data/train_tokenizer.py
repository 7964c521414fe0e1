"""Train a small byte-level BPE tokenizer, saved as a Hugging Face tokenizer directory.

The tiny demo models use a few thousand tokens instead of GPT-2's 50k, which keeps the
embedding table (and the logits) small enough for CPU training. Byte-level BPE never
produces unknown tokens, so any text the models see later can be encoded.

Usage::

    python -m aligner.data.train_tokenizer --input corpus.txt --vocab-size 4096 --output tok/
    python -m aligner.data.train_tokenizer --input sft.jsonl --field prompt --field answer \\
        --vocab-size 4096 --output tok/
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Iterable, Iterator, List, Optional, Sequence

from aligner.data.atomic_io import write_text_atomic
from aligner.data.errors import DataFormatError
from aligner.data.jsonl import PathLike, check_file_exists, iter_jsonl
from aligner.data.tokenizer import Tokenizer

SPECIAL_TOKEN = "<|endoftext|>"
# A pad distinct from eos: Hugging Face sequence classifiers score the last non-pad token,
# which must be the eos our reward models are trained to score.
PAD_TOKEN = "<|pad|>"
_NUM_BYTES = 256


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: PathLike, min_frequency: int = 2
) -> Tokenizer:
    """Train byte-level BPE on ``texts`` and save it to ``out_dir``; return it loaded back.

    ``<|endoftext|>`` serves as bos and eos, as in GPT-2; ``<|pad|>`` pads.
    The result depends only on the texts (in order), ``vocab_size`` and ``min_frequency``.
    ``vocab_size`` is an upper bound: a small corpus may run out of pairs that occur at least
    ``min_frequency`` times before reaching it.

    Files written (each atomically, other files in ``out_dir`` are left alone):
    ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < _NUM_BYTES + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs {_NUM_BYTES} byte tokens "
            f"plus {SPECIAL_TOKEN}, so at least {_NUM_BYTES + 1}"
        )
    raw = RawTokenizer(models.BPE())
    # add_prefix_space=False: a prompt and its answer are tokenized separately and the answer
    # carries its own leading space, so the tokenizer must not invent one.
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[SPECIAL_TOKEN, PAD_TOKEN],
        # All 256 byte symbols, even ones absent from the corpus, so nothing is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_non_empty(texts), trainer=trainer)

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomic(os.path.join(out_dir, "tokenizer.json"), raw.to_str(pretty=True))
    specials = {"bos_token": SPECIAL_TOKEN, "eos_token": SPECIAL_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        # PreTrainedTokenizerFast (not transformers 5's TokenizersBackend) loads in 4.x and 5.x.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    write_text_atomic(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2) + "\n")
    write_text_atomic(os.path.join(out_dir, "special_tokens_map.json"), json.dumps(specials, indent=2) + "\n")
    return Tokenizer.from_pretrained(out_dir)


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text


def read_texts(paths: Sequence[PathLike], fields: Optional[Sequence[str]] = None) -> Iterator[str]:
    """Texts from plain-text files (one per line) or ``.jsonl`` files (the given ``fields``)."""
    for path in paths:
        path = os.fspath(path)
        if path.endswith(".jsonl"):
            if not fields:
                raise ValueError(f"{path}: a .jsonl input needs --field NAME (repeatable) to say which text fields to use")
            for line, record in iter_jsonl(path):
                for field in fields:
                    if field not in record:
                        raise DataFormatError(path, f"missing field {field!r} (given by --field)", line)
                    if not isinstance(record[field], str):
                        raise DataFormatError(path, f"field {field!r} must be a string", line)
                    yield record[field]
        else:
            check_file_exists(path)
            with open(path, encoding="utf-8") as f:
                for text in f:
                    text = text.rstrip("\r\n")
                    if text.strip():
                        yield text


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="text files (one text per line) or .jsonl files")
    parser.add_argument("--field", action="append", help="text field of .jsonl inputs; repeat for several")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--output", required=True, help="directory to write the tokenizer files to")
    args = parser.parse_args(argv)
    tok = train_bpe_tokenizer(read_texts(args.input, args.field), args.vocab_size, args.output, args.min_frequency)
    print(f"wrote {args.output}: {tok}")


if __name__ == "__main__":
    main()
