import json
import logging
import math
import re

import pytest
import torch

from aligner.data.comparisons import ComparisonDataset
from aligner.data.errors import DataFormatError
from aligner.data.prompts import PromptDataset
from aligner.data.sft import SFTDataset
from aligner.data.train_tokenizer import train_bpe_tokenizer

CORPUS = [
    "User: what is a good movie?\nAssistant: A warm and funny film about friendship.",
    "The acting is wooden and the plot makes no sense.",
    "I loved every minute of it, the music was great.",
    "Question: name a dull film. Answer: The long and tedious one.",
] * 4


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return train_bpe_tokenizer(CORPUS, 300, tmp_path_factory.mktemp("tok"))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def loc(path, line):
    """Regex for the ``file:line:`` prefix of an error message."""
    return "^" + re.escape(f"{path}:{line}:")


# ----------------------------------------------------------------------------- SFT


def test_sft_both_key_pairs_and_mask_covers_exactly_the_answer(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "what is a good movie?", "answer": " A warm and funny film."},
        {"input": "name a dull film.", "output": " The long one."},
    ])
    ds = SFTDataset(path, tok, max_seq_length=64)
    assert len(ds) == 2
    for i, (prompt, answer) in enumerate([("what is a good movie?", " A warm and funny film."),
                                          ("name a dull film.", " The long one.")]):
        item = ds[i]
        tokens, mask = item["tokens"], item["loss_mask"]
        assert tokens.dtype == torch.long and mask.dtype == torch.bool and tokens.shape == mask.shape
        assert tok.decode(tokens[~mask]) == prompt
        assert tok.decode(tokens[mask]) == answer + "<|endoftext|>"
        # mask is one contiguous block at the end and the last token is eos
        first = int(mask.nonzero()[0])
        assert mask[first:].all() and not mask[:first].any()
        assert int(tokens[-1]) == tok.eos_id
        assert tokens.tolist() == tok.encode(prompt) + tok.encode(answer) + [tok.eos_id]


def test_sft_prompt_template_and_no_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "what is a good movie?", "answer": " A film."}])
    ds = SFTDataset(path, tok, 64, prompt_template="User: {prompt}\nAssistant:", add_eos=False)
    item = ds[0]
    assert tok.decode(item["tokens"][~item["loss_mask"]]) == "User: what is a good movie?\nAssistant:"
    assert tok.decode(item["tokens"][item["loss_mask"]]) == " A film."
    with pytest.raises(ValueError, match="model.data.prompt_template"):
        SFTDataset(path, tok, 64, prompt_template="User: {question}")


def test_sft_truncate_vs_drop_counts(tmp_path, tok, caplog):
    short = {"prompt": "Hi", "answer": " ok"}
    long_answer = {"prompt": "Hi", "answer": " " + "the music was great " * 10}
    long_prompt = {"prompt": "the plot makes no sense " * 10, "answer": " ok"}
    path = write_jsonl(tmp_path / "sft.jsonl", [short, long_answer, long_prompt, short])
    max_len = 12
    prompt_len = len(tok.encode("Hi"))

    with caplog.at_level(logging.WARNING, logger="aligner.data"):
        ds = SFTDataset(path, tok, max_len, truncation="truncate")
    assert (ds.num_truncated, ds.num_dropped, len(ds)) == (1, 1, 3)
    truncated = ds[1]
    assert truncated["tokens"].numel() == max_len
    assert int(truncated["loss_mask"].sum()) == max_len - prompt_len
    # the kept answer tokens are the beginning of the answer (the end was cut)
    full_answer = tok.encode(long_answer["answer"])
    assert truncated["tokens"][prompt_len:].tolist() == full_answer[: max_len - prompt_len]
    messages = [r.getMessage() for r in caplog.records if r.name == "aligner.data"]
    assert len(messages) == 1 and "1 truncated, 1 dropped" in messages[0]

    ds = SFTDataset(path, tok, max_len, truncation="drop")
    assert (ds.num_truncated, ds.num_dropped, len(ds)) == (0, 2, 2)
    assert all(ds[i]["tokens"].numel() <= max_len for i in range(len(ds)))


def test_sft_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "answer": " b"}, {"prompt": "a", "response": "b"}])
    with pytest.raises(DataFormatError, match=loc(path, 2) + r" expected fields \{'prompt', 'answer'\} or \{'input', 'output'\}"):
        SFTDataset(path, tok, 64)
    path = write_jsonl(tmp_path / "sft2.jsonl", [{"prompt": "a", "answer": 3}])
    with pytest.raises(DataFormatError, match=loc(path, 1) + " field 'answer' must be a string"):
        SFTDataset(path, tok, 64)
    path = write_jsonl(tmp_path / "sft3.jsonl", [{"prompt": "a", "answer": " b"}, '{"prompt": "a", "answer"'])
    with pytest.raises(DataFormatError, match=loc(path, 2) + " invalid JSON"):
        SFTDataset(path, tok, 64)
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "answer": " b"}])
    with pytest.raises(ValueError, match=r"model\.data\.truncation='cut'"):
        SFTDataset(ok, tok, 64, truncation="cut")
    with pytest.raises(DataFormatError, match=r"no usable SFT samples: all 1 samples are longer"):
        SFTDataset(ok, tok, 2, truncation="drop")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataFormatError, match="contains no records"):
        SFTDataset(empty, tok, 64)
    with pytest.raises(DataFormatError, match=re.escape(f"{tmp_path / 'missing.jsonl'}: file not found")):
        SFTDataset(tmp_path / "missing.jsonl", tok, 64)


# ----------------------------------------------------------------------------- comparisons


def test_comparisons_prompt_chosen_rejected_with_rewards(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "Review:", "chosen": " A warm film.", "rejected": " A dull film.", "chosen_reward": 2.5, "rejected_reward": -1},
        {"prompt": "", "chosen": "Great music.", "rejected": "No sense."},
    ])
    ds = ComparisonDataset(path, tok, 64)
    assert len(ds) == 2
    item = ds[0]
    for side, answer in (("chosen", " A warm film."), ("rejected", " A dull film.")):
        tokens, plen = item[side], item[f"{side}_prompt_len"]
        assert plen == len(tok.encode("Review:"))
        assert tok.decode(tokens[:plen]) == "Review:"
        assert tok.decode(tokens[plen:]) == answer + "<|endoftext|>"
    assert (item["chosen_reward"], item["rejected_reward"]) == (2.5, -1.0)
    item = ds[1]
    assert item["chosen_prompt_len"] == item["rejected_prompt_len"] == 0
    assert tok.decode(item["chosen"]) == "Great music.<|endoftext|>"
    assert math.isnan(item["chosen_reward"]) and math.isnan(item["rejected_reward"])


def test_comparisons_realhf_lists_give_one_pair_per_index(tmp_path, tok):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Q:", "pos_answers": [" good", " great"], "neg_answers": [" bad", " dull"]},
        {"prompt": "Z:", "pos_answers": [" fine"], "neg_answers": [" no"]},
    ])
    ds = ComparisonDataset(path, tok, 64)
    pairs = [(tok.decode(ds[i]["chosen"]), tok.decode(ds[i]["rejected"])) for i in range(len(ds))]
    eos = "<|endoftext|>"
    assert pairs == [(f"Q: good{eos}", f"Q: bad{eos}"), (f"Q: great{eos}", f"Q: dull{eos}"), (f"Z: fine{eos}", f"Z: no{eos}")]


def test_comparisons_alternating_text_uses_common_prefix_as_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"text": "User: a movie?\nAssistant: A warm film."},
        {"text": "User: a movie?\nAssistant: The plot makes no sense."},
        {"text": "abc"},
        {"text": "abc def"},  # chosen is a prefix of rejected: eos still differs
    ])
    ds = ComparisonDataset(path, tok, 64)
    assert len(ds) == 2
    item = ds[0]
    c, r = item["chosen"].tolist(), item["rejected"].tolist()
    n = item["chosen_prompt_len"]
    assert n == item["rejected_prompt_len"]
    # independent longest-common-prefix reference
    ref = next(i for i in range(min(len(c), len(r)) + 1) if i == min(len(c), len(r)) or c[i] != r[i])
    assert n == ref and tok.decode(c[:n]).startswith("User: a movie?\nAssistant:")
    assert c[:n] == r[:n] and c[n] != r[n]
    item = ds[1]
    assert tok.decode(item["chosen"][item["chosen_prompt_len"]:]) == "<|endoftext|>"


def test_comparison_errors_name_file_and_line(tmp_path, tok):
    cases = {
        "mismatch.jsonl": ([{"prompt": "", "pos_answers": ["a"], "neg_answers": ["b"]},
                            {"prompt": "", "pos_answers": ["a", "b"], "neg_answers": ["c"]}],
                           2, "'pos_answers' has 2 entries but 'neg_answers' has 1"),
        "odd.jsonl": ([{"text": "a"}, {"text": "b"}, {"text": "c"}], 3, "odd number of records"),
        "mixed.jsonl": ([{"prompt": "", "chosen": "a", "rejected": "b"}, {"text": "a"}],
                        2, "alternating text format but line 1 is in prompt/chosen/rejected format"),
        "missing.jsonl": ([{"prompt": "", "chosen": "a", "rejected": "b"}, {"prompt": "", "chosen": "a"}],
                          2, "missing field 'rejected'"),
        "unknown.jsonl": ([{"question": "a"}], 1, "not a comparison record"),
        "reward.jsonl": ([{"prompt": "", "chosen": "a", "rejected": "b", "chosen_reward": "high", "rejected_reward": 1}],
                         1, "'chosen_reward' must be a finite number"),
        "half.jsonl": ([{"prompt": "", "chosen": "a", "rejected": "b", "chosen_reward": 1.0}],
                       1, "both 'chosen_reward' and 'rejected_reward' or neither"),
        "json.jsonl": ([{"text": "a"}, "{'text': 'b'}"], 2, "invalid JSON"),
    }
    for name, (records, line, problem) in cases.items():
        path = write_jsonl(tmp_path / name, records)
        with pytest.raises(DataFormatError, match=loc(path, line) + ".*" + re.escape(problem)):
            ComparisonDataset(path, tok, 64)
    with pytest.raises(DataFormatError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: file not found")):
        ComparisonDataset(tmp_path / "nope.jsonl", tok, 64)


def test_comparisons_truncate_vs_drop(tmp_path, tok):
    long = " " + "the music was great " * 8
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "Hi", "chosen": " ok", "rejected": " no"},
        {"prompt": "Hi", "chosen": long, "rejected": " no"},
        {"prompt": "the plot makes no sense " * 6, "chosen": " ok", "rejected": " no"},
    ])
    ds = ComparisonDataset(path, tok, 10)
    assert (ds.num_truncated, ds.num_dropped, len(ds)) == (1, 1, 2)
    item = ds[1]
    assert item["chosen"].numel() == 10
    assert item["chosen"][item["chosen_prompt_len"]:].tolist() == tok.encode(long)[: 10 - len(tok.encode("Hi"))]
    assert tok.decode(item["rejected"]) == "Hi no<|endoftext|>"  # the short side is untouched
    ds = ComparisonDataset(path, tok, 10, truncation="drop")
    assert (ds.num_truncated, ds.num_dropped, len(ds)) == (0, 2, 1)
    with pytest.raises(ValueError, match="model.data.truncation"):
        ComparisonDataset(path, tok, 10, truncation="left")


# ----------------------------------------------------------------------------- prompts


def test_prompts_accept_synonyms_template_and_index(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a movie?"}, {"text": "the plot"}, {"input": "music", "x": 1}])
    ds = PromptDataset(path, tok, 32, prompt_template="User: {prompt}\nAssistant:")
    assert [ds[i]["text"] for i in range(3)] == ["a movie?", "the plot", "music"]
    assert [ds[i]["index"] for i in range(3)] == [0, 1, 2]
    assert tok.decode(ds[1]["prompt_tokens"]) == "User: the plot\nAssistant:"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"question": "b"}])
    with pytest.raises(DataFormatError, match=loc(bad, 2) + " expected one of the fields 'prompt', 'text', 'input'"):
        PromptDataset(bad, tok, 32)


def test_prompts_truncate_from_the_left_or_drop(tmp_path, tok):
    long = "the plot makes no sense and the acting is wooden"
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": long}])
    full = tok.encode(long)
    assert len(full) > 5
    ds = PromptDataset(path, tok, 5)
    assert (ds.num_truncated, ds.num_dropped, len(ds)) == (1, 0, 2)
    assert ds[1]["prompt_tokens"].tolist() == full[-5:]  # the end of the prompt is kept
    assert ds[1]["text"] == long
    ds = PromptDataset(path, tok, 5, add_bos=True)
    assert ds[1]["prompt_tokens"].tolist() == [tok.bos_id] + full[-4:]
    ds = PromptDataset(path, tok, 5, truncation="drop")
    assert (ds.num_truncated, ds.num_dropped, len(ds)) == (0, 1, 1)
    with pytest.raises(ValueError, match="ppo.prompt_truncation='x'"):
        PromptDataset(path, tok, 5, truncation="x", truncation_config_key="ppo.prompt_truncation")
