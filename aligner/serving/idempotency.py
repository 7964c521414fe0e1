"""Idempotency keys for state-changing endpoints (train, save).

A client that lost a response (timeout, reset, server restart of the HTTP front) retries with
the same ``Idempotency-Key``. The server must then return the first outcome instead of
training the critic twice on the same batch. Three cases, decided atomically by
:meth:`IdempotencyCache.begin`:

* the key finished before      -> replay the recorded response (handler not called);
* the key is executing now     -> wait for that execution's response (not run twice);
* the key is new               -> the caller runs the request and calls :meth:`finish`.

Only successful (2xx) responses are kept: a request that failed (busy, invalid, handler error)
changed nothing the client can rely on, so a retry must be allowed to run again. A key reused
with a different body is a client bug and raises :class:`KeyConflict` (HTTP 409). The last
``capacity`` finished keys are kept (LRU); keys in flight are never evicted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RecordedResponse:
    """Enough of an HTTP response to send it again byte for byte."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class InFlight:
    """One executing request; duplicates wait on ``done``."""

    scope: str
    key: str
    body_hash: str
    done: threading.Event = field(default_factory=threading.Event)
    response: RecordedResponse | None = None

    def wait(self, timeout_s: float) -> RecordedResponse | None:
        """The first execution's response, or None if it is still running after timeout_s."""
        if self.done.wait(timeout_s):
            return self.response
        return None


class KeyConflict(Exception):
    """The key was first used with a different request body."""


@dataclass(frozen=True)
class Decision:
    """What begin() decided: kind is "replay" (response set), "wait" or "run" (entry set)."""

    kind: str
    response: RecordedResponse | None = None
    entry: InFlight | None = None


class IdempotencyCache:
    """Thread-safe store of finished and in-flight requests, keyed by (scope, key)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"idempotency_cache_size must be >= 1, got {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._done: OrderedDict[tuple[str, str], tuple[str, RecordedResponse]] = OrderedDict()
        self._in_flight: dict[tuple[str, str], InFlight] = {}
        self.replays = 0

    def begin(self, scope: str, key: str, body_hash: str) -> Decision:
        """Decide replay / wait / run for one request; raise KeyConflict on a body mismatch."""
        slot = (scope, key)
        with self._lock:
            finished = self._done.get(slot)
            if finished is not None:
                first_hash, response = finished
                if first_hash != body_hash:
                    raise KeyConflict(_conflict_message(scope, key))
                self._done.move_to_end(slot)
                self.replays += 1
                return Decision("replay", response=response)
            running = self._in_flight.get(slot)
            if running is not None:
                if running.body_hash != body_hash:
                    raise KeyConflict(_conflict_message(scope, key))
                self.replays += 1
                return Decision("wait", entry=running)
            entry = InFlight(scope, key, body_hash)
            self._in_flight[slot] = entry
            return Decision("run", entry=entry)

    def finish(self, entry: InFlight, response: RecordedResponse) -> None:
        """Publish the outcome to waiters; remember it only if it succeeded."""
        slot = (entry.scope, entry.key)
        with self._lock:
            self._in_flight.pop(slot, None)
            if 200 <= response.status < 300:
                self._done[slot] = (entry.body_hash, response)
                self._done.move_to_end(slot)
                while len(self._done) > self.capacity:
                    self._done.popitem(last=False)
            entry.response = response
            entry.done.set()

    def forget_finished(self) -> int:
        """Drop every recorded response (the state they answered for was rewound); returns how many."""
        with self._lock:
            dropped = len(self._done)
            self._done.clear()
            return dropped

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "recorded": len(self._done),
                "in_flight": len(self._in_flight),
                "replays": self.replays,
                "capacity": self.capacity,
            }


def _conflict_message(scope: str, key: str) -> str:
    return (
        f"Idempotency-Key {key!r} was already used for a different /{scope} body; "
        "use a new key for every distinct request"
    )
