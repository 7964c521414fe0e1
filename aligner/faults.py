"""Named fault points: kill this process at a chosen, deterministic place (for fault tests).

``ALIGNER_FAULT="critic.before_save@2"`` makes the 2nd arrival at
``fault_point("critic.before_save")`` SIGKILL the process: no cleanup, no flush, as an OOM kill
or a lost node would. Several points may be given, comma-separated; ``@N`` defaults to 1.
With the variable unset every fault point is a dictionary lookup and nothing else.

Points in the code (grep ``fault_point(``):
  critic.infer          the critic server is computing an /v1/infer
  critic.train          the critic has applied a train request's optimizer steps, not answered
  critic.before_save    a /v1/save arrived (every train before it was answered), nothing written
  actor.generate        the actor is generating a step's rollouts
  actor.update          the actor is in its policy update
  checkpoint.before_commit  a checkpoint's files are written, its COMPLETE marker is not
  train.after_step      the shared SFT/RM/DPO loop finished an optimizer step (metrics logged,
                        validation and checkpoint done if due), before the next batch
"""
from __future__ import annotations

import logging
import os
import signal
import threading

ENV = "ALIGNER_FAULT"
log = logging.getLogger("aligner.faults")

_lock = threading.Lock()
_hits: dict[str, int] = {}


def parse(spec: str) -> dict[str, int]:
    """'a@2,b' -> {'a': 2, 'b': 1}; ValueError naming ALIGNER_FAULT on a malformed entry."""
    plan = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("@")
        if not name or (count and (not count.isdigit() or int(count) < 1)):
            raise ValueError(f"{ENV}={spec!r}: expected 'name[@N]' entries with N >= 1, got {part!r}")
        plan[name] = int(count) if count else 1
    return plan


def fault_point(name: str) -> None:
    """SIGKILL this process if ``ALIGNER_FAULT`` names this point for this arrival."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target = parse(spec).get(name)
    if target is None:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        hit = _hits[name]
    if hit == target:
        log.warning("fault point %s reached (arrival %d): SIGKILL", name, hit)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
