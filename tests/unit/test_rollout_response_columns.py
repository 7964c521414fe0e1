"""Log-softmax only from the first response column: the policy loss and the log-prob pass on
the sliced columns equal the same maths over the whole row (float64 reference, every loss_agg_mode)."""
import pytest
import torch

from aligner.objectives.kl import token_kl
from aligner.objectives.masks import first_masked_column, response_mask
from aligner.objectives.policy_loss import LOSS_AGG_MODES, aggregate_loss, clipped_policy_loss
from aligner.rollout.engine import PolicyLoss, TokenLogProbs, UpdateSettings


def test_first_masked_column_by_hand():
    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    assert first_masked_column(mask) == 2
    assert first_masked_column(mask[:1]) == 3
    assert first_masked_column(torch.zeros(2, 5)) == 0  # nothing counts: the whole row
    assert first_masked_column(torch.ones(1, 4, dtype=torch.bool)) == 0


def _batch(seed: int, width: int = 12, vocab: int = 11):
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths, lengths = torch.tensor([5, 4, 7, 6]), torch.tensor([10, 12, 9, 7])
    mask = response_mask(prompt_lengths, lengths, width)
    logits = torch.randn(4, width, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (4, width), generator=generator)
    return logits, {"labels": labels, "policy_mask": mask, "mask": mask,
                    "old_logprobs": -torch.rand(4, width, generator=generator, dtype=torch.float64) * 3,
                    "ref_logprobs": -torch.rand(4, width, generator=generator, dtype=torch.float64) * 3,
                    "advantages": torch.randn(4, width, generator=generator, dtype=torch.float64)}


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_policy_loss_on_response_columns_equals_whole_row(mode):
    logits, batch = _batch(0)
    settings = UpdateSettings(epochs=1, mini_batch_size=4, micro_batch_size=4, clip_ratio_low=0.2,
                              clip_ratio_high=0.28, entropy_coef=0.01, loss_agg_mode=mode, kl_loss_coef=0.1)
    _, loss_fn = PolicyLoss(settings).forward(lambda tokens, *a, **k: logits, {"tokens": batch["labels"], **batch})
    total, count, sums = loss_fn(logits)
    assert first_masked_column(batch["policy_mask"]) == 3  # columns 0..2 were really dropped

    # the whole row in float64, written out without the engine
    mask = batch["policy_mask"].double()
    log_p = torch.log_softmax(logits, -1)
    logprobs = log_p.gather(-1, batch["labels"][..., None])[..., 0]
    width = float(mask.shape[-1])
    loss, _ = clipped_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, 0.2, 0.28,
                                  loss_agg_mode=mode, loss_scale_factor=width)
    entropy = -(log_p.exp() * log_p).sum(-1)
    bonus = (entropy * mask).sum() / mask.sum() if mode == "token-mean" else aggregate_loss(
        entropy, mask, mode, loss_scale_factor=width)
    kl = aggregate_loss(token_kl(logprobs, batch["ref_logprobs"], "k3"), mask, mode, loss_scale_factor=width)
    expected = loss - 0.01 * bonus + 0.1 * kl
    assert float(total / count) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_log_prob_pass_fills_response_columns_and_zeroes_the_rest():
    logits, batch = _batch(1)
    out = TokenLogProbs().outputs(logits, batch)["logprobs"]
    expected = torch.log_softmax(logits, -1).gather(-1, batch["labels"][..., None])[..., 0]
    start = first_masked_column(batch["mask"])
    assert torch.allclose(out[:, start:].double(), expected[:, start:], atol=1e-6)
    assert torch.equal(out[:, :start], torch.zeros_like(out[:, :start]))
    masked = batch["mask"].bool()
    assert torch.allclose(out[masked].double(), expected[masked], atol=1e-6)
