"""The vocabulary projection and log-softmax only from the first response column: logits,
the policy loss (every loss_agg_mode, its gradients) and the log-prob pass equal the same maths
over whole rows (written out here in float64, without the engine), on a real megatron GPTModel."""
import pytest
import torch

from aligner.distributed.setup import initialize
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_gpt, next_token_logits, position_ids_for
from aligner.objectives.kl import token_kl
from aligner.objectives.masks import first_masked_column, response_mask
from aligner.objectives.policy_loss import LOSS_AGG_MODES, aggregate_loss, clipped_policy_loss
from aligner.rollout.engine import PolicyLoss, TokenLogProbs, UpdateSettings

CONFIG = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                     num_attention_heads=4, max_position_embeddings=32)
WIDTH = 12


@pytest.fixture(scope="module")
def model():
    initialize(1, 1, seed=3)
    return build_gpt(CONFIG, torch.float32)


def test_first_masked_column_by_hand():
    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    assert first_masked_column(mask) == 2
    assert first_masked_column(mask[:1]) == 3
    assert first_masked_column(torch.zeros(2, 5)) == 0  # nothing counts: the whole row
    assert first_masked_column(torch.ones(1, 4, dtype=torch.bool)) == 0


def _batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    mask = response_mask(torch.tensor([5, 4, 7, 6]), torch.tensor([10, 12, 9, 7]), WIDTH)
    tokens = torch.randint(1, CONFIG.vocab_size, (4, WIDTH), generator=generator)
    labels = torch.cat([tokens[:, 1:], torch.zeros(4, 1, dtype=torch.long)], dim=1)
    rand = lambda: torch.rand(4, WIDTH, generator=generator)  # noqa: E731
    return {"tokens": tokens, "labels": labels, "policy_mask": mask, "mask": mask,
            "old_logprobs": -rand() * 5, "ref_logprobs": -rand() * 5, "advantages": rand() * 2 - 1}


def test_logits_from_a_column_are_the_whole_rows_columns(model):
    tokens = _batch(0)["tokens"]
    with torch.no_grad():
        whole = model(tokens, position_ids_for(tokens), None, runtime_gather_output=True)
        for first in (0, 3, 11):
            part = next_token_logits(model, tokens, first)
            assert part.shape == (4, WIDTH - first, CONFIG.vocab_size)
            assert torch.allclose(part, whole[:, first:], atol=1e-5)
    assert "forward" not in vars(model.output_layer)  # the projection is itself again afterwards


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_policy_loss_on_response_columns_equals_whole_rows(model, mode):
    batch = _batch(1)
    settings = UpdateSettings(epochs=1, mini_batch_size=4, micro_batch_size=4, clip_ratio_low=0.2,
                              clip_ratio_high=0.28, entropy_coef=0.01, loss_agg_mode=mode, kl_loss_coef=0.1)
    model.zero_grad()
    logits, loss_fn = PolicyLoss(settings).forward(model, batch)
    assert logits.shape[1] == WIDTH - 3  # columns 0..2 (prompt only) were never projected
    total, count, _ = loss_fn(logits)
    (total / count).backward()
    ours = float(total / count)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # whole rows, float64 maths
    model.zero_grad()
    tokens = batch["tokens"]
    log_p = torch.log_softmax(model(tokens, position_ids_for(tokens), None, runtime_gather_output=True).double(), -1)
    mask = batch["policy_mask"].double()
    logprobs = log_p.gather(-1, batch["labels"][..., None])[..., 0]
    loss, _ = clipped_policy_loss(logprobs, batch["old_logprobs"].double(), batch["advantages"].double(), mask,
                                  0.2, 0.28, loss_agg_mode=mode, loss_scale_factor=float(WIDTH))
    entropy = -(log_p.exp() * log_p).sum(-1)
    bonus = (entropy * mask).sum() / mask.sum() if mode == "token-mean" else aggregate_loss(
        entropy, mask, mode, loss_scale_factor=float(WIDTH))
    kl = aggregate_loss(token_kl(logprobs, batch["ref_logprobs"].double(), "k3"), mask, mode,
                        loss_scale_factor=float(WIDTH))
    expected = loss - 0.01 * bonus + 0.1 * kl
    expected.backward()
    assert ours == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    for name, param in model.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-6, rtol=1e-4), name


def test_log_prob_pass_fills_response_columns_and_zeroes_the_rest(model):
    batch = _batch(2)
    with torch.no_grad():
        out = TokenLogProbs().outputs(TokenLogProbs().run(model, batch), batch)["logprobs"]
        tokens = batch["tokens"]
        whole = model(tokens, position_ids_for(tokens), None, runtime_gather_output=True)
    expected = torch.log_softmax(whole.double(), -1).gather(-1, batch["labels"][..., None])[..., 0]
    start = first_masked_column(batch["mask"])
    assert start == 3 and torch.equal(out[:, :start], torch.zeros(4, start))
    assert torch.allclose(out[:, start:].double(), expected[:, start:], atol=1e-5)


def test_dpo_loss_and_reference_pass_on_answer_columns_equal_whole_rows(model):
    """DPO's reference pass and loss (with validation's exact KL) from the first answer column."""
    import torch.nn.functional as F

    from aligner.data.collate import collate_comparisons
    from aligner.trainers.dpo import PreferenceLoss, ReferenceLogProbs

    generator = torch.Generator().manual_seed(4)
    ids = lambda n: torch.randint(1, CONFIG.vocab_size, (n,), generator=generator)  # noqa: E731
    items = [{"chosen": ids(p + c), "rejected": ids(p + r), "chosen_prompt_len": p, "rejected_prompt_len": p,
              "chosen_reward": float("nan"), "rejected_reward": float("nan")} for p, c, r in ((4, 5, 3), (6, 2, 4))]
    batch = collate_comparisons(items, pad_id=0)
    reference = {"ref_token_logps": -torch.rand(batch["labels"].shape, generator=generator) * 4}
    with torch.no_grad():
        ref = ReferenceLogProbs(keep_distribution=True)
        records = ref.outputs(ref.run(model, batch), batch)
    assert records["log_probs_full"].shape[1] == batch["labels"].shape[1] - 3  # from the first answer column
    batch.update(reference, ref_log_probs_full=records["log_probs_full"])
    loss = PreferenceLoss(beta=0.1, loss_type="dpo", average_log_probs=False, sft_loss_weight=0.0,
                          preference_loss_weight=1.0, gt_reward_scale=1.0)
    with torch.no_grad():
        output, loss_fn = loss.forward(model, batch)
        total, pairs, sums = loss_fn(output)
        tokens = batch["tokens"]
        log_p = torch.log_softmax(model(tokens, position_ids_for(tokens), None, runtime_gather_output=True).double(), -1)
    mask = batch["loss_mask"].double()
    token_lp = log_p.gather(-1, batch["labels"][..., None])[..., 0]
    margin = ((token_lp - reference["ref_token_logps"].double()) * mask).sum(-1)
    expected = -F.logsigmoid(0.1 * (margin[:2] - margin[2:])).mean()
    assert float(total / pairs) == pytest.approx(float(expected), rel=1e-5)
    # the reference pass's token log-probs, zero before the first answer column
    assert torch.allclose(records["token_logps"][:, 3:].double(), token_lp[:, 3:], atol=1e-5)
    # validation's KL: the policy is the reference here, so exactly zero on every answer token
    kl_sum, kl_tokens = sums["kl_to_ref"]
    assert float(kl_tokens) == float(mask.sum()) and abs(float(kl_sum)) < 1e-4


def test_zero_old_and_reference_log_probs_in_masked_columns_leave_gradients_finite(model):
    """Reused sampler log-probs and a log-prob micro-batch that started at a later column leave
    zeros in masked columns of old/ref log-probs. With a peaked policy (log-probs near -1000
    there) k3 = exp(ref - logp) - ... overflows: the masked gradient must stay 0, not 0 * inf."""
    batch = _batch(5)
    mask = batch["policy_mask"]
    settings = UpdateSettings(epochs=1, mini_batch_size=4, micro_batch_size=4, clip_ratio_low=0.2,
                              kl_loss_coef=0.1, kl_loss_type="k3")
    weight = model.output_layer.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(300.0)  # a very peaked next-token distribution
            tokens = batch["tokens"]
            whole = model(tokens, position_ids_for(tokens), None, runtime_gather_output=True)
            own = torch.log_softmax(whole.float(), -1).gather(-1, batch["labels"][..., None])[..., 0]
        assert own[mask == 0].min() < -100  # exp(0 - logp) overflows float32 in the masked columns
        # the policy's own log-probs where the loss counts, zeros wherever nothing counts
        batch["old_logprobs"] = batch["ref_logprobs"] = own * mask
        model.zero_grad()
        logits, loss_fn = PolicyLoss(settings).forward(model, batch)
        total, count, _ = loss_fn(logits)
        (total / count).backward()
        assert torch.isfinite(total)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
        model.zero_grad()
