"""Build the built-in arithmetic task: generated problems with exact answers, no downloads.

The verifiable-reward example for the critic-free algorithms: a prompt is a problem such as
``"37+48="``, the policy should answer ``"85"``, and
``aligner.rollout.rewards.arithmetic:exact_match`` scores it from the row's ``answer``.

Outputs in ``--output-dir``::

    prompts_{train,val}.jsonl   {"prompt": "37+48=", "answer": "85"}    (GRPO etc. rollouts; the
                                                                          answer reaches the reward
                                                                          function as a field)
    sft_{train,val}.jsonl       {"prompt": "37+48=", "answer": "85"}    (SFT warm start; the SFT
                                                                          reader appends eos)
    tokenizer/                  byte-level BPE; with the default --vocab-size 258 it has no merges,
                                so every character (digit) is its own token
    manifest.json               arguments, record counts, file checksums

Every problem appears at most once across all files: one seeded shuffle of distinct problems is
cut into validation first, then SFT, then RL training prompts, so the three sets are disjoint
and ``--val-size`` problems stay the same when the other sizes change. Re-running with the same
arguments rewrites byte-identical files.

Usage::

    python -m aligner.data.prep.arithmetic --output-dir data/arithmetic
    python -m aligner.data.prep.arithmetic --output-dir DIR --digits 2..3 --operators +-* \\
        --train-size 20000 --sft-size 2000 --val-size 500 --seed 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from aligner.data.atomic_io import replace_dir_atomic, write_text_atomic
from aligner.data.jsonl import write_jsonl
from aligner.data.prep.movie_reviews import sha256_file
from aligner.data.train_tokenizer import train_bpe_tokenizer

OPERATORS = "+-*"
# Up to this many distinct problems, enumerate them all and shuffle; beyond, draw at random.
_ENUMERATE_LIMIT = 400_000


@dataclass(frozen=True)
class Problem:
    left: int
    operator: str
    right: int

    @property
    def prompt(self) -> str:
        return f"{self.left}{self.operator}{self.right}="

    @property
    def answer(self) -> int:
        if self.operator == "+":
            return self.left + self.right
        if self.operator == "-":
            return self.left - self.right
        return self.left * self.right

    def record(self) -> Dict[str, str]:
        return {"prompt": self.prompt, "answer": str(self.answer)}


def operand_range(digits: Tuple[int, int]) -> Tuple[int, int]:
    """Smallest and largest operand with ``MIN..MAX`` digits (1 digit includes 0)."""
    lo, hi = digits
    return (0 if lo == 1 else 10 ** (lo - 1)), 10 ** hi - 1


def count_problems(digits: Tuple[int, int], operators: str, negative_results: bool) -> int:
    """How many distinct problems the settings allow."""
    lo, hi = operand_range(digits)
    n = hi - lo + 1
    total = 0
    for op in operators:
        total += n * (n + 1) // 2 if (op == "-" and not negative_results) else n * n
    return total


def _canonical(left: int, op: str, right: int, negative_results: bool) -> Problem:
    if op == "-" and not negative_results and left < right:
        left, right = right, left
    return Problem(left, op, right)


def _all_problems(digits, operators, negative_results) -> Iterator[Problem]:
    lo, hi = operand_range(digits)
    for op in operators:
        ordered = op == "-" and not negative_results  # each pair once, larger operand first
        for left in range(lo, hi + 1):
            for right in range(lo, (left if ordered else hi) + 1):
                yield Problem(left, op, right)


def generate_problems(
    count: int, digits: Tuple[int, int], operators: str, negative_results: bool, seed: int
) -> List[Problem]:
    """``count`` distinct problems in a seeded random order.

    Raises:
        ValueError: when fewer than ``count`` distinct problems exist for these settings.
    """
    available = count_problems(digits, operators, negative_results)
    if count > available:
        raise ValueError(
            f"--val-size + --sft-size + --train-size = {count} problems, but --digits {digits[0]}..{digits[1]} "
            f"with --operators {operators!r} allow only {available} distinct ones: ask for fewer, or allow more "
            f"digits or operators"
        )
    rng = random.Random(seed)
    if available <= _ENUMERATE_LIMIT:
        problems = list(_all_problems(digits, operators, negative_results))
        rng.shuffle(problems)
        return problems[:count]
    lo, hi = operand_range(digits)
    seen, problems = set(), []
    while len(problems) < count:
        problem = _canonical(rng.randint(lo, hi), rng.choice(operators), rng.randint(lo, hi), negative_results)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems


def parse_digits(value: str) -> Tuple[int, int]:
    """``"1..2"`` -> (1, 2); ``"2"`` -> (2, 2)."""
    try:
        lo, _, hi = value.partition("..")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--digits {value!r}: expected MIN..MAX (e.g. 1..2) or N") from None
    if not 1 <= lo_i <= hi_i <= 18:
        raise argparse.ArgumentTypeError(f"--digits {value!r}: need 1 <= MIN <= MAX <= 18")
    return lo_i, hi_i


def parse_operators(value: str) -> str:
    """``"+-"`` -> ``"+-"``: a non-empty set of ``+``, ``-``, ``*`` (order kept, duplicates dropped)."""
    ops = "".join(dict.fromkeys(value.replace(",", "")))
    if not ops or set(ops) - set(OPERATORS):
        raise argparse.ArgumentTypeError(f"--operators {value!r}: use any of {OPERATORS!r}, e.g. +- or +-*")
    return ops


def flawed_answer(record: Dict[str, str], rng: random.Random, rate: float) -> Dict[str, str]:
    """The record with a spurious trailing '0' on its answer with probability ``rate``.

    The draw is made for every record, so the same seed flaws the same rows at any rate.
    """
    if rng.random() < rate:
        return {**record, "answer": record["answer"] + "0"}
    return record


def worded(problem: str, prompt_format: str) -> str:
    """A rollout prompt: ``prompt_format`` with {problem} = '37+48=' and {expression} = '37+48'."""
    return prompt_format.format(problem=problem, expression=problem.rstrip("="))


def check_prompt_format(prompt_format: str) -> None:
    """SystemExit naming --prompt-format unless it places the problem exactly through its fields."""
    try:
        text = worded("1+2=", prompt_format)
    except (KeyError, IndexError, ValueError) as exc:
        raise SystemExit(f"--prompt-format {prompt_format!r}: only {{problem}} and {{expression}} may be used "
                         f"({type(exc).__name__}: {exc})") from None
    if "1+2" not in text:
        raise SystemExit(f"--prompt-format {prompt_format!r} must contain {{problem}} or {{expression}}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aligner.data.prep.arithmetic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits", type=parse_digits, default=(1, 2), metavar="MIN..MAX",
                        help="digits per operand (default 1..2: operands 0..99)")
    parser.add_argument("--operators", type=parse_operators, default="+-", help="any of + - * (default +-)")
    parser.add_argument("--negative-results", action="store_true",
                        help="allow a-b < 0 (default: the larger operand comes first)")
    parser.add_argument("--train-size", type=int, default=4000, help="RL training prompts")
    parser.add_argument("--sft-size", type=int, default=2000, help="SFT warm-start examples (train split)")
    parser.add_argument("--sft-val-size", type=int, default=200, help="SFT validation examples")
    parser.add_argument("--val-size", type=int, default=500, help="held-out RL validation prompts")
    parser.add_argument("--sft-trailing-zero-rate", type=float, default=0.0, metavar="P",
                        help="a flawed SFT teacher: append a spurious '0' to this fraction of the SFT answers "
                             "(e.g. 85 -> 850), chosen by a seeded draw. A warm start that can add but whose "
                             "greedy answers are often wrong: room for RL to improve (default 0: exact answers)")
    parser.add_argument("--prompt-format", default="{problem}", metavar="FORMAT",
                        help="how a rollout prompt (prompts_*.jsonl) is worded: {problem} is '37+48=', "
                             "{expression} is '37+48'; e.g. 'What is {expression}? Reply with only the number.' "
                             "for an instruction-tuned model (default: the bare problem)")
    parser.add_argument("--vocab-size", type=int, default=258,
                        help="tokenizer size; 258 = 256 bytes + 2 special tokens, i.e. no merges: one token per digit")
    return parser


def prepare(argv: Optional[Sequence[str]] = None) -> Dict:
    """Parse command-line style arguments, write the data set, return the manifest."""
    args = build_parser().parse_args(argv)
    sizes = {"val": args.val_size, "sft_val": args.sft_val_size, "sft": args.sft_size, "train": args.train_size}
    for name, size in sizes.items():
        if size < 0 or (size == 0 and name in ("train", "val")):
            raise SystemExit(f"--{name.replace('_', '-')}-size={size}: must be {'>= 1' if name in ('train', 'val') else '>= 0'}")
    check_prompt_format(args.prompt_format)
    if not 0.0 <= args.sft_trailing_zero_rate <= 1.0:
        raise SystemExit(f"--sft-trailing-zero-rate={args.sft_trailing_zero_rate}: must be in [0, 1]")
    problems = generate_problems(sum(sizes.values()), args.digits, args.operators, args.negative_results, args.seed)
    parts: Dict[str, List[Problem]] = {}
    start = 0
    for name, size in sizes.items():  # validation first: it does not move when the other sizes change
        parts[name] = problems[start:start + size]
        start += size

    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    outputs = {
        "prompts_train.jsonl": parts["train"],
        "prompts_val.jsonl": parts["val"],
        "sft_train.jsonl": parts["sft"],
        "sft_val.jsonl": parts["sft_val"],
    }
    flaw = random.Random(f"trailing-zero:{args.seed}")
    files: Dict[str, Dict] = {}
    for name, part in outputs.items():
        path = os.path.join(out, name)
        records = [p.record() for p in part]
        if name.startswith("sft_"):
            records = [flawed_answer(r, flaw, args.sft_trailing_zero_rate) for r in records]
        else:
            records = [{**r, "prompt": worded(r["prompt"], args.prompt_format)} for r in records]
        write_jsonl(path, records)
        files[name] = {"records": len(part), "sha256": sha256_file(path)}

    corpus = [p.prompt + str(p.answer) for p in parts["sft"] + parts["train"]]
    with replace_dir_atomic(os.path.join(out, "tokenizer")) as tmp_dir:
        tokenizer = train_bpe_tokenizer(corpus, args.vocab_size, tmp_dir)

    manifest = {
        "format_version": 1,
        "task": "arithmetic",
        "seed": args.seed,
        "arguments": {
            "seed": args.seed,
            "digits": list(args.digits),
            "operators": args.operators,
            "negative_results": args.negative_results,
            "train_size": args.train_size,
            "sft_size": args.sft_size,
            "sft_val_size": args.sft_val_size,
            "val_size": args.val_size,
            "vocab_size": args.vocab_size,
            "sft_trailing_zero_rate": args.sft_trailing_zero_rate,
            "prompt_format": args.prompt_format,
        },
        "distinct_problems_available": count_problems(args.digits, args.operators, args.negative_results),
        "files": files,
        "tokenizer": {
            "dir": "tokenizer",
            "vocab_size": tokenizer.vocab_size,
            "sha256": sha256_file(os.path.join(out, "tokenizer", "tokenizer.json")),
        },
        "reward_function": "aligner.rollout.rewards.arithmetic:exact_match",
    }
    # Written last: a manifest present means the directory is complete.
    write_text_atomic(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    print(f"arithmetic data in {out} (digits {args.digits[0]}..{args.digits[1]}, operators {args.operators!r}, "
          f"seed {args.seed}):")
    for name, info in files.items():
        print(f"  {name:22s} {info['records']:6d} records")
    print(f"  tokenizer/             vocab {tokenizer.vocab_size}")
    return manifest


def main(argv: Optional[List[str]] = None) -> None:
    prepare(argv)


if __name__ == "__main__":
    main()
