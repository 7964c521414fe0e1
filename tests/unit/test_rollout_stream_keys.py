"""RolloutEngine.stream_keys: which random stream each rollout row draws from.

The layout-independence of rollouts rests on this: the keys of a global batch must be the same
whether one rank generates it or data-parallel ranks each generate their slice, and distinct for
every (step, round, prompt, sample) and between training and validation.
"""
from types import SimpleNamespace

from aligner.rollout.engine import RolloutEngine


def _engine(step: int = 3, seed: int = 1234):
    return SimpleNamespace(cfg=SimpleNamespace(model=SimpleNamespace(seed=seed)), run=SimpleNamespace(step=step))


def _rows(prompts: list[int], samples: int) -> list[tuple[int, int]]:
    """What RolloutEngine.generate builds: (local prompt position, dataset index), samples consecutive."""
    return [(g, i) for g, i in enumerate(prompts) for _ in range(samples)]


def _keys(engine, prompts, samples, first_prompt, fixed_seed=False, seed=None, round_=0):
    return RolloutEngine.stream_keys(engine, _rows(prompts, samples), first_prompt, fixed_seed, seed, round_)


def test_data_parallel_slices_get_the_keys_of_the_whole_batch():
    prompts = [17, 3, 99, 42, 8, 61, 5, 23]  # dataset indices of one step's global batch
    engine = _engine()
    whole = _keys(engine, prompts, 3, first_prompt=0)
    for dp in (2, 4):
        per_rank = len(prompts) // dp
        sliced = [k for r in range(dp) for k in _keys(engine, prompts[r * per_rank:(r + 1) * per_rank], 3,
                                                       first_prompt=r * per_rank)]
        assert sliced == whole, dp
    assert len(set(whole)) == len(whole)  # every sample of every prompt has its own stream


def test_steps_rounds_and_validation_draw_from_disjoint_streams():
    prompts = list(range(8))
    streams = [_keys(_engine(step=s), prompts, 4, 0, round_=r) for s in (0, 1, 2) for r in (0, 1)]
    validation = _keys(_engine(step=0), prompts, 4, 0, fixed_seed=True, seed=7)
    flat = [k for keys in streams for k in keys] + validation
    assert len(set(flat)) == len(flat)
    # validation is fixed across evaluations (the step is not part of its key); its seed is
    assert _keys(_engine(step=5), prompts, 4, 0, fixed_seed=True, seed=7) == validation
    assert _keys(_engine(step=0), prompts, 4, 0, fixed_seed=True, seed=8) != validation
    # and training streams follow the run seed
    assert _keys(_engine(seed=1), prompts, 4, 0) != _keys(_engine(seed=2), prompts, 4, 0)


def test_a_row_key_names_the_prompt_position_not_the_dataset_index():
    """Keys follow a row's position in the global batch, not the prompt's content: a prompt that a
    small dataset puts twice into one step gets two streams."""
    engine = _engine()
    twice = _keys(engine, [9, 9], 1, 0)
    assert twice == _keys(engine, [5, 6], 1, 0) and len(set(twice)) == 2
    assert _keys(engine, [5], 1, 0) != _keys(engine, [5], 1, 1)
