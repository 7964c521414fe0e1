"""The frozen initial policy used as a reference (DPO, PPO), parked in host memory."""
from __future__ import annotations

from aligner.models.weight_swap import ParkedWeights
from aligner.training.run import Run


def park_initial_weights(run: Run) -> ParkedWeights:
    """The weights the run started from, even after a resume (the reference never drifts)."""
    if run.step == 0:
        return ParkedWeights(run.model)
    # Resumed: the live weights are trained ones; rebuild the initial weights the way the run
    # first built them (same seed, then the same pretrained checkpoint, if any).
    # The rebuild re-seeds every RNG; the resumed run's streams (restored from its checkpoint) are
    # put back afterwards, or resuming would not continue the same random sequence.
    from aligner.distributed.setup import seed_everything
    from aligner.models.gpt import build_gpt
    from aligner.training.checkpoint import rng_state, set_rng_state

    resumed_rng = rng_state()
    seed_everything(int(run.cfg.model.seed))
    fresh = build_gpt(run.model_config, run.dtype, run.layout.tensor_parallel, run.layout.pipeline_parallel,
                      scalar_head=run.scalar_head)
    run.init_weights(fresh)
    set_rng_state(resumed_rng)
    return ParkedWeights.from_state(run.model, dict(fresh.named_parameters()))
