"""Token log-probabilities, entropies, sequence log-probabilities and the SFT loss.

References are float64 and written differently from the code under test: plain Python/math
loops for values, and torch's own ``log_softmax`` (whose backward is not ours) for gradients.
"""

import math

import pytest
import torch

from aligner.objectives.logprobs import entropy_from_logits, sequence_logprobs, token_logprobs_from_logits
from aligner.objectives.sft import language_model_loss_sum_and_count, masked_language_model_loss


def _python_logprob(row, label):
    """log softmax(row)[label] with a plain max-shifted loop."""
    m = max(row)
    return row[label] - (m + math.log(sum(math.exp(v - m) for v in row)))


def _python_entropy(row):
    m = max(row)
    z = sum(math.exp(v - m) for v in row)
    probs = [math.exp(v - m) / z for v in row]
    return -sum(p * math.log(p) for p in probs)


# --- token_logprobs_from_logits -------------------------------------------------------------


def test_token_logprobs_hand_worked():
    # logits (0, 0, ln 2) -> probabilities (1/4, 1/4, 1/2)
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [0.0, 0.0, math.log(2.0)]]])
    labels = torch.tensor([[2, 0]])
    out = token_logprobs_from_logits(logits, labels)
    assert out.shape == (1, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[math.log(0.5), math.log(0.25)]]))


def test_token_logprobs_hand_worked_gradient():
    # d log p_y / d logit_v = 1[v == y] - p_v; with p = (1/4, 1/4, 1/2) and y = 2:
    # gradient (-1/4, -1/4, 1/2).
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)]]], requires_grad=True)
    (grad,) = torch.autograd.grad(token_logprobs_from_logits(logits, torch.tensor([[2]])).sum(), logits)
    torch.testing.assert_close(grad, torch.tensor([[[-0.25, -0.25, 0.5]]]))


@pytest.mark.parametrize("chunk_tokens", [1, 4, 4096])
def test_token_logprobs_match_float64_reference(chunk_tokens):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    out = token_logprobs_from_logits(logits, labels, chunk_tokens=chunk_tokens)
    assert out.dtype == torch.float64

    expected = torch.tensor(
        [[_python_logprob(logits[b, s].tolist(), labels[b, s].item()) for s in range(5)] for b in range(3)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)

    # Gradients under a random upstream gradient, against torch's log_softmax.
    upstream = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * upstream).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = torch.log_softmax(ref_logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), ref_logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_token_logprobs_gradcheck():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(lambda x: token_logprobs_from_logits(x, labels, chunk_tokens=2), (logits,))


def test_token_logprobs_bf16_computes_in_float32():
    gen = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(2, 3, 50, generator=gen)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 50, (2, 3), generator=gen)
    out = token_logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    # The bf16 values themselves are exact inputs; only the arithmetic may differ, and in float32
    # it should agree with float64 to float32 precision.
    ref_logits = logits.detach().double().requires_grad_()
    ref = torch.log_softmax(ref_logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)

    (grad,) = torch.autograd.grad(out.sum(), logits)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-2)


def test_token_logprobs_huge_logits_are_finite():
    logits = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]]], requires_grad=True)
    labels = torch.tensor([[1, 2]])
    out = token_logprobs_from_logits(logits, labels)
    # Row 0: label logit -1e4 vs max 1e4 -> -2e4. Row 1: two equal maxima -> log(1/2), up to
    # float32's spacing near 1e4 (~1e-3), which any logit - logsumexp formula inherits.
    torch.testing.assert_close(out.detach(), torch.tensor([[-2e4, math.log(0.5)]]), rtol=0, atol=2e-3)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(grad).all()


def test_token_logprobs_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match=r"\[batch, seq, vocab\]"):
        token_logprobs_from_logits(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_reference_logits_without_grad():
    with torch.no_grad():
        out = token_logprobs_from_logits(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]))
    torch.testing.assert_close(out, torch.full((1, 2), math.log(0.25)))


# --- entropy_from_logits --------------------------------------------------------------------


def test_entropy_hand_worked():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0), -1e4]]])
    out = entropy_from_logits(logits)
    # Uniform over 4 -> ln 4. (1/4, 1/4, 1/2, ~0) -> 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2.
    torch.testing.assert_close(out, torch.tensor([[math.log(4.0), 1.5 * math.log(2.0)]]))


def test_entropy_matches_reference_values_and_gradients():
    gen = torch.Generator().manual_seed(3)
    logits = (2 * torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    out = entropy_from_logits(logits)
    expected = torch.tensor([[_python_entropy(logits[b, s].tolist()) for s in range(3)] for b in range(2)],
                            dtype=torch.float64)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)

    # Reference gradient from H = log Z - sum(p * x) with p = exp(x) / Z.
    ref_logits = logits.detach().clone().requires_grad_()
    z = ref_logits.exp().sum(-1, keepdim=True)
    ref = z.squeeze(-1).log() - (ref_logits.exp() / z * ref_logits).sum(-1)
    upstream = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * upstream).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), ref_logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


def test_entropy_bf16_returns_float32():
    logits = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    out = entropy_from_logits(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[math.log(8.0)]]))


# --- sequence_logprobs ----------------------------------------------------------------------


def test_sequence_logprobs_sum_and_average():
    token_lp = torch.tensor([[-1.0, -2.0, -3.0, -100.0], [-0.5, -0.5, 7.0, 7.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(sequence_logprobs(token_lp, mask, average=False), torch.tensor([-6.0, -0.5, 0.0]))
    torch.testing.assert_close(sequence_logprobs(token_lp, mask, average=True), torch.tensor([-2.0, -0.5, 0.0]))


def test_sequence_logprobs_gradient_only_on_selected_tokens():
    token_lp = torch.tensor([[-1.0, -2.0, -3.0, float("-inf")]], requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 0]])
    (grad,) = torch.autograd.grad(sequence_logprobs(token_lp, mask, average=True).sum(), token_lp)
    torch.testing.assert_close(grad, torch.tensor([[0.5, 0.0, 0.5, 0.0]]))


# --- SFT loss -------------------------------------------------------------------------------


def test_sft_loss_hand_worked_and_token_weighted():
    token_lp = torch.tensor([[-1.0, -2.0, -9.0], [-4.0, -9.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = masked_language_model_loss(token_lp, mask)
    # Token-weighted: (1 + 2 + 4) / 3, not the mean of per-row means (1.5 + 4) / 2.
    torch.testing.assert_close(loss, torch.tensor(7.0 / 3.0))
    (grad,) = torch.autograd.grad(loss, token_lp)
    third = 1.0 / 3.0
    torch.testing.assert_close(grad, torch.tensor([[-third, -third, 0.0], [-third, 0.0, 0.0]]))

    sum_nll, n_tokens = language_model_loss_sum_and_count(token_lp, mask)
    torch.testing.assert_close(sum_nll, torch.tensor(7.0))
    torch.testing.assert_close(n_tokens, torch.tensor(3.0))


def test_sft_sum_and_count_combine_micro_batches_exactly():
    gen = torch.Generator().manual_seed(4)
    token_lp = -torch.rand(4, 6, generator=gen, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=gen) > 0.4).long()
    parts = [language_model_loss_sum_and_count(token_lp[i : i + 2], mask[i : i + 2]) for i in (0, 2)]
    combined = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    expected = -sum(token_lp[b, s].item() for b in range(4) for s in range(6) if mask[b, s]) / mask.sum().item()
    torch.testing.assert_close(combined, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(masked_language_model_loss(token_lp, mask), combined)


def test_sft_loss_empty_mask_is_zero_with_zero_gradient():
    token_lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.zeros(1, 2)
    loss = masked_language_model_loss(token_lp, mask)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, token_lp)
    assert torch.equal(grad, torch.zeros(1, 2))
    sum_nll, n_tokens = language_model_loss_sum_and_count(token_lp, mask)
    assert sum_nll.item() == 0.0 and n_tokens.item() == 0.0


def test_sft_loss_bf16_input():
    token_lp = torch.full((2, 3), -0.7, dtype=torch.bfloat16)
    loss = masked_language_model_loss(token_lp, torch.ones(2, 3))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(-token_lp[0, 0].float().item() * 1.0))
