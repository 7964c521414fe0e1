import math

import pytest
import torch

from aligner.data.collate import collate_comparisons, collate_prompts, collate_sft, right_pad

PAD = 0


def t(values):
    return torch.tensor(values, dtype=torch.long)


def test_right_pad_lengths_multiple_and_fixed_length():
    tokens, lengths = right_pad([t([5, 6, 7]), t([8])], PAD)
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert lengths.tolist() == [3, 1]
    tokens, _ = right_pad([t([5, 6, 7]), t([8])], 9, pad_to_multiple_of=4)
    assert tokens.tolist() == [[5, 6, 7, 9], [8, 9, 9, 9]]
    tokens, _ = right_pad([t([5, 6, 7])], 9, pad_to_length=5, pad_to_multiple_of=4)
    assert tokens.shape == (1, 8)
    with pytest.raises(ValueError, match="pad_to_length=2"):
        right_pad([t([5, 6, 7])], 9, pad_to_length=2)


def test_collate_sft_shifts_labels_and_mask_by_one():
    # sample 0: prompt [11, 12], answer [13, 14, 2]; sample 1: prompt [21], answer [22, 2]
    items = [
        {"tokens": t([11, 12, 13, 14, 2]), "loss_mask": torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool)},
        {"tokens": t([21, 22, 2]), "loss_mask": torch.tensor([0, 1, 1], dtype=torch.bool)},
    ]
    batch = collate_sft(items, PAD)
    assert batch["tokens"].tolist() == [[11, 12, 13, 14, 2], [21, 22, 2, 0, 0]]
    # Hand-worked: position i predicts token i+1.
    assert batch["labels"].tolist() == [[12, 13, 14, 2, 0], [22, 2, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["lengths"].tolist() == [5, 3]
    # Every masked label is an answer token: the masked labels are exactly the answers.
    for row, answer in enumerate([[13, 14, 2], [22, 2]]):
        assert batch["labels"][row][batch["loss_mask"][row].bool()].tolist() == answer


def test_collate_comparisons_stacks_chosen_then_rejected():
    items = [
        {"chosen": t([1, 2, 3, 4]), "rejected": t([1, 2, 5]), "chosen_prompt_len": 2, "rejected_prompt_len": 2,
         "chosen_reward": 1.5, "rejected_reward": -2.0},
        {"chosen": t([7, 8]), "rejected": t([7, 9, 9, 9, 9]), "chosen_prompt_len": 0, "rejected_prompt_len": 1,
         "chosen_reward": float("nan"), "rejected_reward": float("nan")},
    ]
    batch = collate_comparisons(items, PAD, pad_to_multiple_of=2)
    assert batch["tokens"].tolist() == [
        [1, 2, 3, 4, 0, 0], [7, 8, 0, 0, 0, 0], [1, 2, 5, 0, 0, 0], [7, 9, 9, 9, 9, 0],
    ]
    assert batch["lengths"].tolist() == [4, 2, 3, 5]
    assert batch["prompt_lengths"].tolist() == [2, 0, 2, 1]
    assert batch["labels"][:, :-1].tolist() == batch["tokens"][:, 1:].tolist()
    assert (batch["labels"][:, -1] == PAD).all()
    # Answer positions j with prompt_len <= j < length, shifted left by one (a prompt_len of 0
    # cannot score token 0: nothing precedes it).
    expected = torch.zeros(4, 6)
    for row, (plen, length) in enumerate([(2, 4), (0, 2), (2, 3), (1, 5)]):
        for j in range(max(plen, 1), length):
            expected[row, j - 1] = 1.0
    assert torch.equal(batch["loss_mask"], expected)
    rewards = batch["gt_rewards"].tolist()
    assert rewards[0] == 1.5 and rewards[2] == -2.0 and math.isnan(rewards[1]) and math.isnan(rewards[3])


def test_collate_prompts_right_pads_and_keeps_index():
    items = [
        {"prompt_tokens": t([4, 5]), "text": "a", "index": 7},
        {"prompt_tokens": t([6, 7, 8]), "text": "b", "index": 2},
    ]
    batch = collate_prompts(items, 99)
    assert batch["prompt_tokens"].tolist() == [[4, 5, 99], [6, 7, 8]]
    assert batch["prompt_lengths"].tolist() == [2, 3]
    assert batch["index"].tolist() == [7, 2]
    assert batch["text"] == ["a", "b"]
