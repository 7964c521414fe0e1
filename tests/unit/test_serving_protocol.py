"""Wire format (safetensors, never pickle) and schema validation of the critic server API."""

import json
import struct

import pytest
import torch

from aligner.serving.protocol import (
    INFER_REQUEST,
    INFER_RESPONSE,
    SAVE_REQUEST,
    TRAIN_REQUEST,
    ProtocolError,
    SizeLimits,
    TensorSpec,
    decode_tensors,
    encode_tensors,
    metrics_from_results,
    parse_save_request,
    results_from_metadata,
    results_to_metadata,
    save_request_metadata,
    validate,
)

BIG = 1 << 30

# safetensors' own dtype names: used to read the header independently of our decoder.
SAFETENSORS_NAMES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _sample(dtype, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(low, high, shape, generator=gen).to(dtype)


def _read_header(body: bytes) -> dict:
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8 : 8 + n])


@pytest.mark.parametrize("dtype", list(SAFETENSORS_NAMES))
def test_round_trip_every_dtype(dtype):
    tensors = {
        "matrix": _sample(dtype, (3, 4), seed=1),
        "scalar": _sample(dtype, (), seed=2),
        "empty": _sample(dtype, (0, 5), seed=3),
        "strided": _sample(dtype, (4, 3), seed=4).t(),  # non-contiguous view
    }
    body = encode_tensors(tensors, {"step": "7", "note": "héllo"})

    # The body is plain safetensors: a little-endian u64 header length and a JSON header.
    header = _read_header(body)
    assert header["__metadata__"] == {"step": "7", "note": "héllo"}
    assert header["matrix"]["dtype"] == SAFETENSORS_NAMES[dtype]
    assert header["strided"]["shape"] == [3, 4]
    assert header["scalar"]["shape"] == []

    decoded, metadata = decode_tensors(body, max_bytes=BIG)
    assert metadata == {"step": "7", "note": "héllo"}
    assert set(decoded) == set(tensors)
    for name, original in tensors.items():
        assert decoded[name].dtype == dtype
        assert decoded[name].shape == original.shape
        assert torch.equal(decoded[name], original), name


def test_round_trip_without_metadata_and_without_tensors():
    decoded, metadata = decode_tensors(encode_tensors({}), max_bytes=BIG)
    assert decoded == {} and metadata == {}


def test_encode_rejects_non_string_metadata_and_non_tensors():
    with pytest.raises(TypeError, match="str"):
        encode_tensors({"x": torch.zeros(2)}, {"step": 3})
    with pytest.raises(TypeError, match="'x'"):
        encode_tensors({"x": [1, 2]})


def _valid_body():
    return encode_tensors({"tokens": torch.arange(6).view(2, 3), "lengths": torch.tensor([3, 1])})


def _payload(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "name, body, status, fragment",
    [
        ("oversize", b"\0" * 101, 413, "max_request_bytes"),
        ("empty", b"", 400, "8-byte"),
        ("short", b"\x01\x02\x03", 400, "8-byte"),
        ("truncated data", _valid_body()[:-4], 400, "safetensors"),
        ("truncated header", _valid_body()[:20], 400, "truncated"),
        ("garbage", bytes(range(7, 99)), 400, "safetensors"),
        ("header not json", struct.pack("<Q", 4) + b"{{{{", 400, "JSON"),
        ("header not object", _payload([1, 2], b""), 400, "object"),
        ("metadata not str", _payload({"__metadata__": {"step": 3}}, b""), 400, "__metadata__"),
        (
            "offsets beyond data",
            _payload({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            400,
            "safetensors",
        ),
    ],
)
def test_decode_rejects_bad_bodies(name, body, status, fragment):
    with pytest.raises(ProtocolError) as info:
        decode_tensors(body, max_bytes=100 if name == "oversize" else BIG)
    assert info.value.status == status, name
    assert fragment in info.value.message, info.value.message


def test_decode_size_limit_is_inclusive():
    body = _valid_body()
    decode_tensors(body, max_bytes=len(body))
    with pytest.raises(ProtocolError) as info:
        decode_tensors(body, max_bytes=len(body) - 1)
    assert info.value.status == 413
    assert str(len(body)) in info.value.message


def _infer(**overrides):
    base = {"tokens": torch.tensor([[5, 6, 7, 0], [1, 2, 0, 0]]), "lengths": torch.tensor([3, 2])}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def _train(**overrides):
    base = {
        "tokens": torch.tensor([[5, 6, 7], [1, 2, 0]]),
        "lengths": torch.tensor([3, 2]),
        "returns": torch.tensor([[0.5, 0.25, 1.0], [0.0, -1.0, 0.0]]),
        "prev_values": torch.zeros(2, 3),
        "mask": torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]),
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_valid_requests_bind_symbolic_dims():
    assert validate(_infer(), INFER_REQUEST) == {"B": 2, "S": 4}
    assert validate(_train(), TRAIN_REQUEST) == {"B": 2, "S": 3}
    # Order of fields must not matter, even though "lengths <= S" needs S from "tokens".
    reordered = dict(reversed(list(_infer().items())))
    assert validate(reordered, INFER_REQUEST) == {"B": 2, "S": 4}
    assert validate({"values": torch.zeros(2, 4)}, INFER_RESPONSE) == {"B": 2, "S": 4}
    assert validate({}, SAVE_REQUEST) == {}


@pytest.mark.parametrize(
    "name, tensors, specs, status, fragments",
    [
        ("missing", _infer(lengths=None), INFER_REQUEST, 400, ["'lengths'", "int64 [B]"]),
        ("unexpected", _infer(extra=torch.zeros(2)), INFER_REQUEST, 400, ["'extra'", "tokens"]),
        ("dtype", _infer(tokens=torch.zeros(2, 4)), INFER_REQUEST, 400, ["'tokens'", "int64", "float32"]),
        ("int32 tokens", _infer(tokens=torch.zeros(2, 4, dtype=torch.int32)), INFER_REQUEST, 400, ["'tokens'", "int32"]),
        ("ndim", _infer(tokens=torch.zeros(8, dtype=torch.int64)), INFER_REQUEST, 400, ["'tokens'", "[B, S]", "[8]"]),
        ("batch mismatch", _infer(lengths=torch.tensor([1, 1, 1])), INFER_REQUEST, 400, ["'lengths'", "B=2", "'tokens'", "[3]"]),
        ("seq mismatch", _train(mask=torch.ones(2, 4)), TRAIN_REQUEST, 400, ["'mask'", "S=3", "[2, 4]"]),
        ("not a tensor", _infer(lengths=[3, 2]), INFER_REQUEST, 400, ["'lengths'"]),
        ("negative token", _infer(tokens=torch.tensor([[5, -1, 7, 0], [1, 2, 0, 0]])), INFER_REQUEST, 422, ["'tokens'", "-1", "(0, 1)"]),
        ("zero length", _infer(lengths=torch.tensor([3, 0])), INFER_REQUEST, 422, ["'lengths'", "(1,)"]),
        ("length > S", _infer(lengths=torch.tensor([5, 2])), INFER_REQUEST, 422, ["'lengths'", "S=4"]),
        ("empty batch", _infer(tokens=torch.zeros(0, 4, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int64)), INFER_REQUEST, 422, ["'tokens'", "B"]),
        ("nan returns", _train(returns=torch.tensor([[0.5, float("nan"), 1.0], [0.0, 0.0, 0.0]])), TRAIN_REQUEST, 422, ["'returns'", "nan", "(0, 1)"]),
        ("inf prev_values", _train(prev_values=torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, float("-inf")]])), TRAIN_REQUEST, 422, ["'prev_values'", "(1, 2)"]),
        ("mask above 1", _train(mask=torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 0.0]])), TRAIN_REQUEST, 422, ["'mask'", "2.0"]),
        ("mask below 0", _train(mask=torch.tensor([[1.0, 1.0, 1.0], [1.0, -0.5, 0.0]])), TRAIN_REQUEST, 422, ["'mask'", "-0.5"]),
        ("float64 returns", _train(returns=torch.zeros(2, 3, dtype=torch.float64)), TRAIN_REQUEST, 400, ["'returns'", "float64"]),
        ("tensor on save", {"x": torch.zeros(1)}, SAVE_REQUEST, 400, ["'x'", "no tensors"]),
        ("nan values out", {"values": torch.tensor([[float("nan")]])}, INFER_RESPONSE, 422, ["'values'"]),
    ],
)
def test_validation_errors_name_the_field(name, tensors, specs, status, fragments):
    with pytest.raises(ProtocolError) as info:
        validate(tensors, specs)
    assert info.value.status == status, (name, info.value.message)
    for fragment in fragments:
        assert fragment in info.value.message, (name, fragment, info.value.message)


def test_fixed_and_free_dims():
    specs = (
        TensorSpec("x", (torch.float32, torch.float16), 2, (None, 3)),
        TensorSpec("y", (torch.int64,), 1, ("N",), required=False, max_value=10),
    )
    assert validate({"x": torch.zeros(7, 3)}, specs) == {}
    assert validate({"x": torch.zeros(1, 3, dtype=torch.float16), "y": torch.tensor([10])}, specs) == {"N": 1}
    with pytest.raises(ProtocolError, match=r"'x'.*dim 1 must be 3"):
        validate({"x": torch.zeros(7, 4)}, specs)
    with pytest.raises(ProtocolError, match=r"'y'.*above the maximum 10"):
        validate({"x": torch.zeros(1, 3), "y": torch.tensor([11])}, specs)
    with pytest.raises(ValueError, match="ndim"):
        TensorSpec("bad", (torch.float32,), 2, ("B",))


def test_save_request_metadata_round_trip_and_errors():
    assert parse_save_request(save_request_metadata(12)) == 12
    assert parse_save_request(save_request_metadata(0)) == 0
    for meta, fragment in [
        ({}, "'step'"),
        ({"step": "-1"}, "'step'"),
        ({"step": "1.5"}, "'step'"),
        ({"step": "٣"}, "'step'"),  # a unicode digit is not a decimal int on the wire
        ({"step": "9" * 5000}, "'step'"),  # would make int() itself raise ValueError
        # where to save is never the client's choice: the key is refused, whatever its value
        ({"step": "3", "path": ""}, "'path'"),
        ({"step": "3", "path": "../../../x"}, "'path'"),
        ({"step": "3", "path": "/tmp/elsewhere"}, "'path'"),
        ({"step": "3", "paht": "/x"}, "'paht'"),
    ]:
        with pytest.raises(ProtocolError) as info:
            parse_save_request(meta)
        assert info.value.status == 400
        assert fragment in info.value.message, (meta, info.value.message)
    with pytest.raises(ValueError):
        save_request_metadata(-2)
    with pytest.raises(TypeError):
        save_request_metadata(3, "/ckpt")  # no path argument any more


def test_size_limits_are_checked_from_shapes_before_values():
    limits = SizeLimits(max_sequence_length=4, max_tokens_per_request=8)
    assert validate(_infer(), INFER_REQUEST, limits) == {"B": 2, "S": 4}
    long = {"tokens": torch.zeros(1, 5, dtype=torch.int64), "lengths": torch.tensor([9])}  # lengths > S too
    with pytest.raises(ProtocolError) as info:
        validate(long, INFER_REQUEST, limits)
    assert info.value.status == 422  # the limit, not the (later) value check of 'lengths'
    assert "'tokens'" in info.value.message and "S=5" in info.value.message
    assert "max_sequence_length=4" in info.value.message
    many = _train(tokens=torch.zeros(3, 3, dtype=torch.int64), lengths=torch.tensor([1, 1, 1]),
                  returns=torch.zeros(3, 3), prev_values=torch.zeros(3, 3), mask=torch.zeros(3, 3))
    with pytest.raises(ProtocolError) as info:
        validate(many, TRAIN_REQUEST, limits)
    assert info.value.status == 413
    assert "3 x 3 = 9" in info.value.message and "max_tokens_per_request=8" in info.value.message
    assert validate(many, TRAIN_REQUEST, SizeLimits(max_tokens_per_request=9)) == {"B": 3, "S": 3}
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_sequence_length"):
            SizeLimits(max_sequence_length=bad)


def test_train_returns_and_values_are_bounded_so_the_loss_cannot_overflow():
    for field in ("returns", "prev_values"):
        huge = torch.zeros(2, 3)
        huge[1, 2] = 1e30
        with pytest.raises(ProtocolError) as info:
            validate(_train(**{field: huge}), TRAIN_REQUEST)
        assert info.value.status == 422 and f"'{field}'" in info.value.message


def test_results_round_trip_exactly():
    results = {"loss": 0.1 + 0.2, "big": 1e300, "nan": float("nan"), "inf": float("-inf"), "n": 3, "path": "/c/s3"}
    back = results_from_metadata(results_to_metadata(results))
    assert back["loss"] == 0.30000000000000004
    assert back["big"] == 1e300 and back["inf"] == float("-inf") and back["nan"] != back["nan"]
    assert back["n"] == 3 and back["path"] == "/c/s3"
    assert results_to_metadata({"t": torch.tensor(2.5)}) == {"t": "2.5"}
    with pytest.raises(TypeError, match="'obj'"):
        results_to_metadata({"obj": object()})
    with pytest.raises(ProtocolError, match="'bad'"):
        results_from_metadata({"bad": "{not json"})
    with pytest.raises(ProtocolError, match="'path'"):
        metrics_from_results({"loss": 1.0, "path": "/x"})
    assert metrics_from_results({"a": 1, "b": 0.5}) == {"a": 1.0, "b": 0.5}
