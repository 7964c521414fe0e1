"""The built-in arithmetic task: generation is deterministic, splits are disjoint, flags set the
difficulty, the files load with the SFT and prompt readers, and the shipped exact-match reward
scores them."""
import json
import operator
import re

import pytest

from aligner.data.jsonl import iter_jsonl
from aligner.data.prep import arithmetic
from aligner.data.prompts import PromptDataset
from aligner.data.sft import SFTDataset
from aligner.data.tokenizer import Tokenizer
from aligner.rollout.rewards.arithmetic import exact_match, final_answer_match, first_integer, last_integer

FILES = ("prompts_train.jsonl", "prompts_val.jsonl", "sft_train.jsonl", "sft_val.jsonl")
SMALL = ["--train-size", "300", "--sft-size", "200", "--sft-val-size", "50", "--val-size", "100"]
_PROBLEM = re.compile(r"^(\d+)([+*-])(\d+)=$")


def _records(path):
    return [r for _, r in iter_jsonl(path)]


def _check_answer(record):
    left, op, right = _PROBLEM.match(record["prompt"]).groups()
    want = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](int(left), int(right))
    assert record["answer"] == str(want), record
    return int(left), op, int(right)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("arithmetic")
    manifest = arithmetic.prepare(["--output-dir", str(out), "--seed", "3", *SMALL])
    return out, manifest


def test_files_counts_answers_and_disjoint_splits(prepared):
    out, manifest = prepared
    assert set(FILES) | {"manifest.json", "tokenizer"} == {p.name for p in out.iterdir()}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    prompts = {}
    for name in FILES:
        rows = _records(out / name)
        assert len(rows) == manifest["files"][name]["records"]
        for row in rows:
            left, op, right = _check_answer(row)
            assert 0 <= left <= 99 and 0 <= right <= 99 and op in "+-"
            assert int(row["answer"]) >= 0  # no negative results by default
        prompts[name] = [r["prompt"] for r in rows]
        assert len(set(prompts[name])) == len(rows)
    assert [len(prompts[n]) for n in FILES] == [300, 100, 200, 50]
    names = list(FILES)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(prompts[a]) & set(prompts[b]), (a, b)


def test_same_arguments_same_bytes_other_seed_other_problems(prepared, tmp_path):
    out, _ = prepared
    again = arithmetic.prepare(["--output-dir", str(tmp_path / "a"), "--seed", "3", *SMALL])
    for name in FILES + ("manifest.json", "tokenizer/tokenizer.json"):
        assert (out / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    assert again["files"] == json.loads((out / "manifest.json").read_text())["files"]
    arithmetic.prepare(["--output-dir", str(tmp_path / "b"), "--seed", "4", *SMALL])
    assert (tmp_path / "b" / "prompts_val.jsonl").read_bytes() != (out / "prompts_val.jsonl").read_bytes()


def test_validation_set_does_not_move_when_other_sizes_change(prepared, tmp_path):
    out, _ = prepared
    arithmetic.prepare(["--output-dir", str(tmp_path), "--seed", "3", "--val-size", "100",
                        "--train-size", "50", "--sft-size", "0", "--sft-val-size", "0"])
    assert (tmp_path / "prompts_val.jsonl").read_bytes() == (out / "prompts_val.jsonl").read_bytes()
    assert _records(tmp_path / "sft_train.jsonl") == []


def test_difficulty_flags(tmp_path):
    arithmetic.prepare(["--output-dir", str(tmp_path / "mul"), "--digits", "3", "--operators", "*",
                        "--train-size", "40", "--sft-size", "0", "--sft-val-size", "0", "--val-size", "10"])
    for row in _records(tmp_path / "mul" / "prompts_train.jsonl"):
        left, op, right = _check_answer(row)
        assert op == "*" and 100 <= left <= 999 and 100 <= right <= 999

    # a space too large to enumerate: drawn at random, still distinct and seeded
    for name in ("neg1", "neg2"):
        arithmetic.prepare(["--output-dir", str(tmp_path / name), "--digits", "4..6", "--operators", "-",
                            "--negative-results", "--train-size", "400", "--sft-size", "0",
                            "--sft-val-size", "0", "--val-size", "10"])
    rows = _records(tmp_path / "neg1" / "prompts_train.jsonl")
    assert rows == _records(tmp_path / "neg2" / "prompts_train.jsonl")
    assert len({r["prompt"] for r in rows}) == 400
    assert any(int(r["answer"]) < 0 for r in rows)
    for row in rows:
        left, _, right = _check_answer(row)
        assert 1000 <= left <= 999_999 and 1000 <= right <= 999_999


def test_too_many_problems_requested():
    assert arithmetic.count_problems((1, 1), "+", False) == 100
    assert arithmetic.count_problems((1, 1), "-", False) == 55
    assert arithmetic.count_problems((1, 1), "-", True) == 100
    assert len(arithmetic.generate_problems(55, (1, 1), "-", False, 0)) == 55
    with pytest.raises(ValueError, match="allow only 100 distinct"):
        arithmetic.generate_problems(101, (1, 1), "+", False, 0)


@pytest.mark.parametrize("argv,match", [
    (["--digits", "0..2"], "--digits"), (["--sft-trailing-zero-rate", "1.5"], "--sft-trailing-zero-rate"),
    (["--prompt-format", "What is {x}?"], "--prompt-format"), (["--prompt-format", "Add!"], "--prompt-format"), (["--operators", "/"], "--operators"), (["--val-size", "0"], "--val-size"),
])
def test_bad_flags(tmp_path, argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        arithmetic.prepare(["--output-dir", str(tmp_path), *argv])
    # argparse prints its errors to stderr; our own checks put the text in SystemExit
    assert match in capsys.readouterr().err + str(e.value.code)


def test_flawed_teacher_only_touches_sft_answers(prepared, tmp_path):
    """--sft-trailing-zero-rate: about that fraction of the SFT answers get a spurious '0'
    (so the exact-match reward calls them wrong); the RL prompts and their answers are untouched."""
    clean, _ = prepared
    arithmetic.prepare(["--output-dir", str(tmp_path), "--seed", "3", *SMALL, "--sft-trailing-zero-rate", "0.6"])
    for name in ("prompts_train.jsonl", "prompts_val.jsonl"):
        assert (tmp_path / name).read_bytes() == (clean / name).read_bytes()
    flawed = 0
    for name in ("sft_train.jsonl", "sft_val.jsonl"):
        for good, bad in zip(_records(clean / name), _records(tmp_path / name)):
            assert bad["prompt"] == good["prompt"]
            if bad["answer"] != good["answer"]:
                assert bad["answer"] == good["answer"] + "0"
                flawed += 1
                scores = exact_match([bad["prompt"]], [bad["answer"]], answer=[good["answer"]])
                assert scores == [0.0 if good["answer"] != "0" else 1.0]
    assert 0.5 < flawed / 250 < 0.7, flawed
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["arguments"]["sft_trailing_zero_rate"] == 0.6


def test_prompt_format_words_only_the_rollout_prompts(prepared, tmp_path):
    """--prompt-format: the RL prompts become instructions around the same problems (an
    instruction-tuned model's recipe); answers, SFT files and the validation problems stay."""
    clean, _ = prepared
    arithmetic.prepare(["--output-dir", str(tmp_path), "--seed", "3", *SMALL,
                        "--prompt-format", "What is {expression}? Reply with only the number."])
    for name in ("sft_train.jsonl", "sft_val.jsonl"):
        assert (tmp_path / name).read_bytes() == (clean / name).read_bytes()
    for name in ("prompts_train.jsonl", "prompts_val.jsonl"):
        for plain, worded in zip(_records(clean / name), _records(tmp_path / name)):
            assert worded == {**plain, "prompt": f"What is {plain['prompt'][:-1]}? Reply with only the number."}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["arguments"]["prompt_format"] == "What is {expression}? Reply with only the number."


def test_files_load_with_the_readers_one_token_per_character(prepared):
    out, _ = prepared
    tokenizer = Tokenizer.from_pretrained(str(out / "tokenizer"))
    assert tokenizer.vocab_size == 258
    assert len(tokenizer.encode("37+48=", add_bos=False)) == 6
    sft = SFTDataset(out / "sft_train.jsonl", tokenizer, max_seq_length=16)
    assert len(sft) == 200 and sft.num_truncated == sft.num_dropped == 0
    prompts = PromptDataset(out / "prompts_val.jsonl", tokenizer, max_prompt_length=8)
    assert len(prompts) == 100


# --- the shipped reward ---------------------------------------------------------------------


def test_first_integer():
    assert first_integer(" 85<|endoftext|>") == 85
    assert first_integer("-12 apples") == -12
    assert first_integer("x=4, y=5") == 4
    assert first_integer("none") is None
    assert first_integer("") is None


def test_exact_match():
    responses = ["85", " 85 because", "86", "-3", "", "eighty-five", "850"]
    answers = ["85", 85, "85", "-3", "0", "85", "85"]
    assert exact_match([""] * 7, responses, answers) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_exact_match_through_the_reward_worker(prepared):
    from aligner.rollout.reward_functions import RewardFunctions, parse_reward_functions

    out, manifest = prepared
    rows = _records(out / "prompts_val.jsonl")[:8]
    responses = [r["answer"] if i % 2 == 0 else "0" for i, r in enumerate(rows)]
    specs = parse_reward_functions([{"path": manifest["reward_function"]}])
    with RewardFunctions(specs, timeout_s=60) as fns:
        result = fns([r["prompt"] for r in rows], responses, answer=[r["answer"] for r in rows])
    want = [1.0 if i % 2 == 0 or r["answer"] == "0" else 0.0 for i, r in enumerate(rows)]
    assert result.rewards.tolist() == want and result.valid.all()


def test_last_integer_and_final_answer_match():
    assert [last_integer(t) for t in ("37 + 48 = 85", "85", "-3 then -12", "none", "")] == [85, 85, -12, None, None]
    responses = ["37 + 48 = 85", "37 + 48 = 86", "85, and 7 is prime", "The answer: 85"]
    assert final_answer_match(["37+48="] * 4, responses, answer=["85"] * 4) == [1.0, 0.0, 0.0, 1.0]
    # the first-integer rule scores the restated problem instead
    assert exact_match(["37+48="], ["37 + 48 = 85"], answer=["85"]) == [0.0]
