"""A stand-in for TensorRT-LLM's LLM API (`tensorrt_llm.LLM`, `tensorrt_llm.SamplingParams`),
for driving aligner's TensorRT-LLM backend through its real call sequence on machines without
CUDA. Put tests/stand_ins on PYTHONPATH and set ALIGNER_TRTLLM_RECORD to a file: every call is
appended to it as a JSON line.

The "engine" reads the Hugging Face checkpoint it is built from (recording a digest of its
weights, so a test can tell which weights it was given) and answers the arithmetic prompts
("37+48=") of a batch alternately right and wrong (result, result + 1), then the end token, in
the checkpoint's own tokenizer: the generations are recognisable wherever they end up (an
exact-match reward of exactly 0.5), and groups of samples disagree, so a policy update moves the
weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

__version__ = "0.0-stand-in"
_PROBLEM = re.compile(r"(\d+)([+*-])(\d+)=")


def _record(event: str, **fields) -> None:
    with open(os.environ["ALIGNER_TRTLLM_RECORD"], "a") as handle:
        handle.write(json.dumps({"event": event, **fields}) + "\n")


def weights_digest(checkpoint_dir: str | os.PathLike) -> str:
    """sha256 over the names and bytes of every tensor of <dir>/model.safetensors."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(checkpoint_dir) / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _Completion:
    def __init__(self, token_ids, logprobs, finish_reason):
        self.token_ids, self.logprobs, self.finish_reason = token_ids, logprobs, finish_reason


class _Result:
    def __init__(self, completion):
        self.outputs = [completion]


class LLM:
    def __init__(self, model, tensor_parallel_size=1, max_batch_size=None, max_seq_len=None, **kwargs):
        from tokenizers import Tokenizer

        self.model_dir = Path(model)
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        _record("build", digest=weights_digest(self.model_dir), tensor_parallel_size=tensor_parallel_size,
                max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        self.alive = True

    def generate(self, prompts, params: SamplingParams):
        assert self.alive, "generate() after shutdown()"
        end_id = params.kwargs["end_id"]
        results, texts = [], []
        for index, prompt in enumerate(prompts):
            text = self.tokenizer.decode(prompt)
            match = _PROBLEM.search(text)
            left, op, right = match.groups()
            answer = {"+": int(left) + int(right), "-": int(left) - int(right), "*": int(left) * int(right)}[op]
            answer += index % 2  # every other answer is off by one
            ids = self.tokenizer.encode(str(answer), add_special_tokens=False).ids + [end_id]
            results.append(_Result(_Completion(ids, [-0.25] * len(ids), "stop")))
            texts.append(f"{text}{answer}")
        _record("generate", prompts=len(prompts), max_tokens=params.kwargs.get("max_tokens"), samples=texts[:2])
        return results

    def shutdown(self):
        self.alive = False
        _record("shutdown")
