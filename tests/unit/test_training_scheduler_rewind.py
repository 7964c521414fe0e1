"""Rewinding a live LR schedule to a checkpoint (the critic's /v1/restore) lands on the
checkpoint's learning rate, not past it."""
import torch

from aligner.training.optim import load_scheduler_state


def _schedule():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    return OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=2,
                                   lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                   wd_incr_steps=10, wd_incr_style="constant",
                                   use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False)


def _advance(scheduler, steps):
    for _ in range(steps):
        scheduler.step(1)
    return scheduler


def test_a_live_schedule_rewinds_to_the_checkpoint_step():
    saved = _advance(_schedule(), 3)
    state = saved.state_dict()
    live = _advance(_schedule(), 7)
    load_scheduler_state(live, state)
    assert live.num_steps == 3
    assert live.optimizer.param_groups[0]["lr"] == saved.optimizer.param_groups[0]["lr"]
    _advance(live, 1), _advance(saved, 1)  # and the schedule continues from there alike
    assert live.optimizer.param_groups[0]["lr"] == saved.optimizer.param_groups[0]["lr"]


def test_megatron_load_state_dict_alone_adds_to_the_live_count():
    """Why load_scheduler_state exists: this is what the critic did before (a wrong LR after a rewind)."""
    state = _advance(_schedule(), 3).state_dict()
    live = _advance(_schedule(), 7)
    live.load_state_dict(state)
    assert live.num_steps == 10
