"""Wire format and request schemas of the critic + reward-model server (API v1).

Every request and response body is one safetensors payload: a dict of named tensors plus the
safetensors ``__metadata__`` dict (str -> str) for small scalars such as a checkpoint step.
Nothing on the wire is ever unpickled, so a hostile or corrupted body can at worst be rejected.

Schemas are declarative: a tuple of :class:`TensorSpec` per endpoint. String dims name a
symbolic size (``"B"`` batch, ``"S"`` sequence) that must agree across every tensor of one
body; :func:`validate` returns the bound sizes. Structural problems (missing or unexpected
field, wrong dtype, wrong shape) are 400; well-formed bodies with bad values (NaN, token id
< 0, length outside 1..S, empty batch) are 422; oversize bodies are 413. A server also bounds
the work one request can ask for (:class:`SizeLimits`: sequence length 422, tokens per request
413), checked from the shapes alone, before any value is read. Every message names the field so
that whoever sees it in an actor log knows what to fix.

Errors and the small JSON documents of /health, /ready and /v1/metrics are JSON; tensors are
never JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import safetensors.torch
import torch

API_VERSION = "v1"

# Bodies are raw safetensors bytes; the type is generic so proxies do not try to be helpful.
CONTENT_TYPE = "application/octet-stream"

# train and save must carry this header: one key per logical request, reused on its retries.
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Set on a response that repeats a recorded result instead of running the handler again.
REPLAY_HEADER = "Idempotent-Replay"

# safetensors prefixes the JSON header with its length as a little-endian u64.
_HEADER_LEN_BYTES = 8
_METADATA_KEY = "__metadata__"


class ProtocolError(Exception):
    """A request or response body that breaks the wire format or the endpoint's schema.

    ``status`` is the HTTP status the server answers with (400, 413 or 422); ``message``
    names the offending field and what was expected.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def encode_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise named tensors (any device, any layout) and str->str metadata to safetensors.

    Tensors are copied to contiguous CPU memory because safetensors refuses strided views.
    """
    flat: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty str, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"field {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        flat[name] = tensor.detach().to("cpu").contiguous()
    meta = None
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(
                    f"metadata must map str to str, got {key!r}: {type(value).__name__}"
                )
        meta = dict(metadata)
    return safetensors.torch.save(flat, metadata=meta)


def decode_tensors(
    body: bytes, max_bytes: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors body into (tensors, metadata).

    Raises ProtocolError 413 when ``body`` exceeds ``max_bytes`` and 400 when it is truncated,
    not safetensors, or carries non-string metadata.
    """
    size = len(body)
    if size > max_bytes:
        raise ProtocolError(
            413, f"body is {size} bytes; the limit is {max_bytes} bytes (max_request_bytes)"
        )
    if size < _HEADER_LEN_BYTES:
        raise ProtocolError(
            400,
            f"body is {size} bytes; a safetensors payload starts with an 8-byte header length",
        )
    header_len = int.from_bytes(body[:_HEADER_LEN_BYTES], "little")
    if header_len > size - _HEADER_LEN_BYTES:
        raise ProtocolError(
            400,
            f"safetensors header claims {header_len} bytes but only "
            f"{size - _HEADER_LEN_BYTES} follow (truncated body, or not safetensors)",
        )
    try:
        header = json.loads(bytes(body[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(400, f"safetensors header is not JSON ({exc}); body is not safetensors")
    if not isinstance(header, dict):
        raise ProtocolError(400, "safetensors header must be a JSON object")
    metadata = header.get(_METADATA_KEY) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ProtocolError(400, "safetensors __metadata__ must map str to str")
    try:
        tensors = safetensors.torch.load(bytes(body))
    except Exception as exc:  # the Rust parser raises its own error types
        raise ProtocolError(400, f"body is not a valid safetensors payload: {exc}") from None
    return tensors, dict(metadata)


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------

Dim = str | int | None


@dataclass(frozen=True)
class TensorSpec:
    """What one named tensor of a body must look like.

    dims: one entry per axis; a str names a symbolic size shared across tensors, an int is a
    fixed size, None is any size. min_value / max_value bound every element (max_value may be
    a symbolic dim name such as "S"). Floating tensors must be finite unless allow_nonfinite.
    """

    name: str
    dtypes: tuple[torch.dtype, ...]
    ndim: int
    dims: tuple[Dim, ...]
    required: bool = True
    min_value: float | None = None
    max_value: float | str | None = None
    allow_nonfinite: bool = False

    def __post_init__(self):
        if len(self.dims) != self.ndim:
            raise ValueError(f"TensorSpec {self.name!r}: dims {self.dims} do not have ndim={self.ndim}")

    def describe(self) -> str:
        """e.g. ``int64 [B, S]`` for error messages."""
        dtypes = "|".join(_dtype_name(d) for d in self.dtypes)
        return f"{dtypes} {_shape_str(self.dims)}"


@dataclass(frozen=True)
class SizeLimits:
    """How much work one request may ask for; None: unbounded.

    max_sequence_length bounds S (the model's context: attention costs S^2, and positions beyond
    the context mean nothing to the model); max_tokens_per_request bounds B x S (memory and time
    grow with it). Both are server settings, named in the messages by these same names.
    """

    max_sequence_length: int | None = None
    max_tokens_per_request: int | None = None

    def __post_init__(self):
        for name in ("max_sequence_length", "max_tokens_per_request"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")

    def check(self, bound: Mapping[str, int], bound_by: Mapping[str, str]) -> None:
        """ProtocolError 422 (S too long) or 413 (B x S too many) naming the field and the limit."""
        seq, batch = bound.get("S"), bound.get("B")
        if seq is not None and self.max_sequence_length is not None and seq > self.max_sequence_length:
            raise ProtocolError(
                422,
                f"field {bound_by['S']!r}: sequence length S={seq} exceeds this server's "
                f"max_sequence_length={self.max_sequence_length} (the model's context unless configured)",
            )
        if seq is not None and batch is not None and self.max_tokens_per_request is not None:
            if batch * seq > self.max_tokens_per_request:
                raise ProtocolError(
                    413,
                    f"field {bound_by['S']!r}: B x S = {batch} x {seq} = {batch * seq} tokens exceeds this "
                    f"server's max_tokens_per_request={self.max_tokens_per_request}; split the batch",
                )


def validate(
    tensors: Mapping[str, torch.Tensor], specs: Sequence[TensorSpec], limits: SizeLimits | None = None
) -> dict[str, int]:
    """Check ``tensors`` against ``specs``; return the symbolic sizes, e.g. {"B": 4, "S": 16}.

    Raises ProtocolError 400 for missing/unexpected fields, wrong dtype or shape, 422 for bad
    values, and what ``limits`` raises for sizes beyond them. Structure and limits are checked for
    every field before any values, so value bounds that name a dim (lengths <= S) work whatever
    order the fields come in, and an oversized request costs no pass over its values.
    """
    known = {spec.name for spec in specs}
    unexpected = sorted(set(tensors) - known)
    if unexpected:
        accepted = ", ".join(f"{s.name} ({s.describe()})" for s in specs) or "no tensors"
        raise ProtocolError(
            400, f"unexpected field(s) {', '.join(map(repr, unexpected))}; accepted: {accepted}"
        )

    bound: dict[str, int] = {}
    bound_by: dict[str, str] = {}
    for spec in specs:
        tensor = tensors.get(spec.name)
        if tensor is None:
            if spec.required:
                raise ProtocolError(400, f"missing field {spec.name!r} ({spec.describe()})")
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ProtocolError(400, f"field {spec.name!r} must be a tensor")
        if tensor.dtype not in spec.dtypes:
            raise ProtocolError(
                400,
                f"field {spec.name!r}: expected dtype "
                f"{'|'.join(_dtype_name(d) for d in spec.dtypes)}, got {_dtype_name(tensor.dtype)}",
            )
        shape = tuple(tensor.shape)
        if len(shape) != spec.ndim:
            raise ProtocolError(
                400,
                f"field {spec.name!r}: expected shape {_shape_str(spec.dims)} ({spec.ndim} dims), "
                f"got {_shape_str(shape)} ({len(shape)} dims)",
            )
        for axis, (want, got) in enumerate(zip(spec.dims, shape)):
            if want is None:
                continue
            if isinstance(want, int):
                if got != want:
                    raise ProtocolError(
                        400,
                        f"field {spec.name!r}: expected shape {_shape_str(spec.dims)}, "
                        f"got {_shape_str(shape)} (dim {axis} must be {want})",
                    )
            elif want in bound:
                if got != bound[want]:
                    raise ProtocolError(
                        400,
                        f"field {spec.name!r}: expected shape {_shape_str(spec.dims)} with "
                        f"{want}={bound[want]} (from {bound_by[want]!r}), got {_shape_str(shape)}",
                    )
            else:
                bound[want] = got
                bound_by[want] = spec.name

    for dim, size in bound.items():
        if size < 1:
            raise ProtocolError(
                422, f"field {bound_by[dim]!r}: dimension {dim} is {size}; send at least one"
            )
    if limits is not None:
        limits.check(bound, bound_by)

    for spec in specs:
        tensor = tensors.get(spec.name)
        if tensor is not None and tensor.numel() > 0:
            _check_values(spec, tensor, bound)
    return bound


def _check_values(spec: TensorSpec, tensor: torch.Tensor, bound: Mapping[str, int]) -> None:
    if tensor.is_floating_point() and not spec.allow_nonfinite:
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            at = _first_index(bad)
            raise ProtocolError(
                422,
                f"field {spec.name!r}: non-finite value {tensor[at].item()} at index {at}; "
                "all values must be finite",
            )
    if spec.min_value is not None:
        low = tensor < spec.min_value
        if bool(low.any()):
            at = _first_index(low)
            raise ProtocolError(
                422,
                f"field {spec.name!r}: value {tensor[at].item()} at index {at} is below the "
                f"minimum {spec.min_value}",
            )
    if spec.max_value is not None:
        limit = bound[spec.max_value] if isinstance(spec.max_value, str) else spec.max_value
        high = tensor > limit
        if bool(high.any()):
            at = _first_index(high)
            name = f"{spec.max_value}={limit}" if isinstance(spec.max_value, str) else str(limit)
            raise ProtocolError(
                422,
                f"field {spec.name!r}: value {tensor[at].item()} at index {at} is above the "
                f"maximum {name}",
            )


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_str(dims: Sequence[Any]) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in dims) + "]"


# Critic + reward model, API v1. Shapes: tokens [B, S] right-padded to S; lengths [B] count the
# real tokens of each row (1..S); values/returns/prev_values/mask are per token [B, S].
_TOKENS = TensorSpec("tokens", (torch.int64,), 2, ("B", "S"), min_value=0)
_LENGTHS = TensorSpec("lengths", (torch.int64,), 1, ("B",), min_value=1, max_value="S")

INFER_REQUEST: tuple[TensorSpec, ...] = (_TOKENS, _LENGTHS)
INFER_RESPONSE: tuple[TensorSpec, ...] = (
    TensorSpec("values", (torch.float32,), 2, ("B", "S")),
    TensorSpec("rewards", (torch.float32,), 1, ("B",), required=False),
)
# Returns and values are bounded well inside float32's range: the squared errors of the value
# loss must not overflow to inf, which would turn the critic's weights into NaN.
MAX_ABS_RETURN = 1.0e6
TRAIN_REQUEST: tuple[TensorSpec, ...] = (
    _TOKENS,
    _LENGTHS,
    TensorSpec("returns", (torch.float32,), 2, ("B", "S"), min_value=-MAX_ABS_RETURN, max_value=MAX_ABS_RETURN),
    TensorSpec("prev_values", (torch.float32,), 2, ("B", "S"), min_value=-MAX_ABS_RETURN,
               max_value=MAX_ABS_RETURN),
    TensorSpec("mask", (torch.float32,), 2, ("B", "S"), min_value=0.0, max_value=1.0),
)
# Train and save responses carry no tensors: their results (metrics, checkpoint info) travel in
# the metadata, one JSON value per key (see results_to_metadata).
TRAIN_RESPONSE: tuple[TensorSpec, ...] = ()
# Save requests carry no tensors: metadata "step" (decimal int >= 0) only. The server always
# writes under its own checkpoint directory; where to save is never the client's choice.
SAVE_REQUEST: tuple[TensorSpec, ...] = ()
SAVE_RESPONSE: tuple[TensorSpec, ...] = ()


def train_request_metadata(step: int | None) -> dict[str, str]:
    """Metadata of a /v1/train body: the PPO step this update completes, when sequenced."""
    if step is None:
        return {}
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"train step must be an int >= 1, got {step!r}")
    return {"step": str(step)}


def parse_train_request(metadata: Mapping[str, str]) -> int | None:
    """The optional PPO step of a /v1/train body; ProtocolError 400 naming the key when malformed.

    A train request with a step is sequenced: the server applies step N only on a state that
    has applied step N-1, so a restarted server cannot take updates out of order.
    """
    unexpected = sorted(set(metadata) - {"step"})
    if unexpected:
        raise ProtocolError(400, f"unexpected metadata key(s) {', '.join(map(repr, unexpected))}; accepted: step")
    raw = metadata.get("step")
    if raw is None:
        return None
    if not _is_decimal(raw) or int(raw) < 1:
        raise ProtocolError(400, f"metadata key 'step' must be a decimal int >= 1, got {raw[:40]!r}")
    return int(raw)


def save_request_metadata(step: int) -> dict[str, str]:
    """Metadata of a /v1/save body."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save step must be an int >= 0, got {step!r}")
    return {"step": str(step)}


def parse_save_request(metadata: Mapping[str, str]) -> int:
    """The step of a /v1/save body; ProtocolError 400 naming the key when malformed.

    A ``path`` key is refused: a checkpoint goes only to the server's own directory (a client
    that chose the directory could make the server write, and prune, anywhere it can).
    """
    if "path" in metadata:
        raise ProtocolError(400, "metadata key 'path' is not accepted: the server saves only under its own "
                                 "checkpoint directory (exp_manager.explicit_log_dir/checkpoints); send 'step' only")
    return _step_only(metadata, minimum=0)


RESTORE_REQUEST: tuple[TensorSpec, ...] = ()


def restore_request_metadata(step: int) -> dict[str, str]:
    """Metadata of a /v1/restore body: the step of one of the server's own checkpoints."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"restore step must be an int >= 1, got {step!r}")
    return {"step": str(step)}


def parse_restore_request(metadata: Mapping[str, str]) -> int:
    """The step of a /v1/restore body; ProtocolError 400 naming the key when malformed. Only a
    step is accepted: the server restores from its own checkpoint directory, never a path."""
    return _step_only(metadata, minimum=1)


def _step_only(metadata: Mapping[str, str], minimum: int) -> int:
    """Metadata holding exactly a decimal 'step' >= minimum; ProtocolError 400 naming the key."""
    unexpected = sorted(set(metadata) - {"step"})
    if unexpected:
        raise ProtocolError(400, f"unexpected metadata key(s) {', '.join(map(repr, unexpected))}; accepted: step")
    raw = metadata.get("step")
    if raw is None:
        raise ProtocolError(400, f"missing metadata key 'step' (decimal int >= {minimum})")
    if not _is_decimal(raw) or int(raw) < minimum:
        raise ProtocolError(400, f"metadata key 'step' must be a decimal int >= {minimum}, got {raw[:40]!r}")
    return int(raw)


_MAX_STEP_DIGITS = 12  # a PPO step beyond 10^12 is a client bug, not a run


def _is_decimal(raw: str) -> bool:
    return raw.isascii() and raw.isdigit() and len(raw) <= _MAX_STEP_DIGITS


def results_to_metadata(results: Mapping[str, Any]) -> dict[str, str]:
    """Encode a flat dict of JSON values (metrics, checkpoint info) as safetensors metadata.

    Python floats round-trip exactly through JSON (repr), including nan/inf.
    """
    meta = {}
    for key, value in results.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        try:
            meta[str(key)] = json.dumps(value, allow_nan=True)
        except TypeError:
            raise TypeError(f"result {key!r} is a {type(value).__name__}, not a JSON value") from None
    return meta


def results_from_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Inverse of results_to_metadata; ProtocolError 400 naming the key on bad JSON."""
    results = {}
    for key, raw in metadata.items():
        try:
            results[key] = json.loads(raw)
        except json.JSONDecodeError:
            raise ProtocolError(400, f"metadata key {key!r} is not a JSON value: {raw[:80]!r}") from None
    return results


def metrics_from_results(results: Mapping[str, Any]) -> dict[str, float]:
    """Train results as floats; ProtocolError 400 naming the key if one is not a number."""
    metrics = {}
    for key, value in results.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(400, f"train metric {key!r} is {value!r}, not a number")
        metrics[key] = float(value)
    return metrics
