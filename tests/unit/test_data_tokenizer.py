import json
import os
import shutil

import pytest

from aligner.data.errors import DataFormatError
from aligner.data.tokenizer import Tokenizer
from aligner.data.train_tokenizer import PAD_TOKEN, SPECIAL_TOKEN, main, train_bpe_tokenizer

CORPUS = [
    "The movie was a delight from start to finish.",
    "A dull, tedious film with no heart at all.",
    "I loved every minute of the movie, and the music was great.",
    "The acting is wooden and the plot makes no sense.",
    "A warm, funny and moving film.",
] * 3


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(CORPUS, 320, out)
    return out


def test_training_is_deterministic_and_writes_hf_files(tok_dir, tmp_path):
    train_bpe_tokenizer(CORPUS, 320, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_transformers_autotokenizer_loads_the_directory(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert hf.eos_token == hf.bos_token == SPECIAL_TOKEN
    assert hf.pad_token == PAD_TOKEN and hf.pad_token_id != hf.eos_token_id
    assert len(hf) > 256
    text = "The movie was great."
    assert hf.encode(text, add_special_tokens=False) == Tokenizer.from_pretrained(tok_dir).encode(text)


def test_special_ids_and_vocab_size(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    special = json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"]
    assert [t["content"] for t in special] == [SPECIAL_TOKEN, PAD_TOKEN]
    assert tok.eos_id == tok.bos_id == special[0]["id"]
    assert tok.pad_id == special[1]["id"] != tok.eos_id
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert tok.vocab_size == len(vocab) <= 320
    assert tok.vocab_size > 257  # learned merges beyond the 256 bytes + special token


def test_encode_decode_round_trip_including_unseen_characters(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    for text in ["The movie was great.", "  spaced  out . text", "unseen: ünïcödé ✓ 日本", " leading space"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eos_id not in ids  # encode adds nothing on its own
    ids = tok.encode("film", add_bos=True)
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode("film")
    assert tok.decode(ids + [tok.eos_id], skip_special_tokens=True) == "film"
    # frequent words of the corpus became single tokens
    assert len(tok.encode(" movie")) == 1


def test_save_and_reload_keeps_encodings(tok_dir, tmp_path):
    tok = Tokenizer.from_pretrained(tok_dir)
    tok.save(tmp_path / "copy")
    again = Tokenizer.from_pretrained(tmp_path / "copy")
    text = "A warm movie with no heart."
    assert again.encode(text) == tok.encode(text)
    assert (again.eos_id, again.bos_id, again.pad_id, again.vocab_size) == (
        tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size
    )


def test_gpt2_style_config_without_bos_or_pad(tok_dir, tmp_path):
    # Tokenizers of other models name only some special tokens; the wrapper must not assume ours.
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIAL_TOKEN})
    )
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.bos_id is None
    assert tok.pad_id == tok.eos_id  # falls back to eos
    assert tok.encode("film", add_bos=True) == tok.encode("film")


def test_directory_without_tokenizer_files_gives_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer files.*tokenizer.json.*found config.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_vocab_size_must_cover_bytes(tmp_path):
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe_tokenizer(CORPUS, 200, tmp_path)


def test_cli_reads_text_and_jsonl_fields(tmp_path, tok_dir):
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(CORPUS[:3]) + "\n\n", encoding="utf-8")
    jl = tmp_path / "b.jsonl"
    jl.write_text("".join(json.dumps({"prompt": s[:10], "answer": s[10:]}) + "\n" for s in CORPUS[3:]))
    main(["--input", str(txt), str(jl), "--field", "prompt", "--field", "answer",
          "--vocab-size", "320", "--output", str(tmp_path / "cli")])
    # Same result as training directly on the texts the CLI should have read, in order.
    expected = CORPUS[:3] + [piece for s in CORPUS[3:] for piece in (s[:10], s[10:])]
    train_bpe_tokenizer(expected, 320, tmp_path / "direct")
    assert (tmp_path / "cli" / "tokenizer.json").read_bytes() == (tmp_path / "direct" / "tokenizer.json").read_bytes()
    only_txt = CORPUS[:2]
    train_bpe_tokenizer(only_txt, 320, tmp_path / "other")
    assert (tmp_path / "other" / "tokenizer.json").read_bytes() != (tmp_path / "direct" / "tokenizer.json").read_bytes()
    assert sorted(os.listdir(tmp_path / "cli")) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"text": "y"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: missing field 'prompt'"):
        main(["--input", str(bad), "--field", "prompt", "--vocab-size", "300", "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="needs --field"):
        main(["--input", str(bad), "--vocab-size", "300", "--output", str(tmp_path / "o")])
