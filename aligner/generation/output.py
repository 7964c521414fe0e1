"""What every generation backend returns: one padded batch of prompt + response."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerationOutput:
    """A generated batch, right-padded.

    tokens: [B, L] prompt followed by response, then pad_id. L = max(prompt + response length).
    prompt_lengths: [B] long.
    response_lengths: [B] long, generated tokens per row, including the EOS token if one was
        produced (and the tokens of a matched end string).
    is_end: [B] bool. True when the row stopped on EOS or an end string, False when it ran out
        of budget (length_params.max_length). PPO treats the two differently (no terminal state).
    generator_logprobs: [B, L-1] float32. Index t holds log p(tokens[t+1] | tokens[:t+1]) under
        the model *as it was when sampling* and under its own, untempered and unfiltered
        distribution; zero at prompt and padding positions. Comparing it with the trainer's
        recomputed log-probs measures the generator/trainer mismatch.
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    is_end: torch.Tensor
    generator_logprobs: torch.Tensor

    @property
    def sequence_lengths(self) -> torch.Tensor:
        """[B] prompt + response length of each row."""
        return self.prompt_lengths + self.response_lengths

    def response_mask(self) -> torch.Tensor:
        """[B, L-1] bool, aligned with generator_logprobs: True where index t predicts a response token."""
        positions = torch.arange(1, self.tokens.shape[1], device=self.tokens.device).unsqueeze(0)
        return (positions >= self.prompt_lengths.unsqueeze(1)) & (positions < self.sequence_lengths.unsqueeze(1))
