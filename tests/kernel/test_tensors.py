"""Tensors on the wire: every dtype round-trips bit for bit, views stay zero-copy, bad references are EPROTO."""

from __future__ import annotations

import enum
import re
import threading
import warnings
import weakref
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from djinn.kernel import abi
from djinn.kernel.codec import DTYPES, Decoder, Frame, encode_frame, tensor_table
from djinn.kernel.errors import EINVAL, EPROTO
from djinn.kernel.tensors import (
    DTYPE_TO_TORCH,
    TENSOR_KEY,
    PayloadPool,
    dtype_name,
    encode_message,
    encode_reply,
    encode_request,
    pack,
    torch_dtype,
    unpack,
)


def roundtrip(header: dict[str, Any], **decoder_kw: Any) -> tuple[Frame, dict[str, Any]]:
    dec = Decoder(**decoder_kw)
    dec.feed(b"".join(encode_message(header)))
    frame = dec.next_frame()
    assert frame is not None
    return frame, unpack(frame.header, frame)


def send(obj: Any, **decoder_kw: Any) -> Any:
    _, header = roundtrip({"id": 1, "ok": True, "result": obj}, **decoder_kw)
    return header["result"]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    nbytes = dtype.itemsize * torch.Size(shape).numel()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def test_every_wire_dtype_is_known_to_torch() -> None:
    assert set(DTYPE_TO_TORCH) == set(DTYPES)
    for name, dtype in DTYPE_TO_TORCH.items():
        assert dtype.itemsize == DTYPES[name]
        assert dtype_name(dtype) == name and torch_dtype(name) is dtype


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 5)], ids=str)
def test_every_dtype_round_trips_bit_for_bit(name: str, shape: tuple[int, ...]) -> None:
    t = random_tensor(DTYPE_TO_TORCH[name], shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = send({"t": t})["t"]
    assert same_bits(out, t)


def test_bfloat16_values() -> None:
    t = torch.tensor([1.0, -2.5, 3.140625, float("inf"), float("nan"), 0.0, -0.0], dtype=torch.bfloat16)
    out = send(t)
    assert out.dtype == torch.bfloat16 and same_bits(out, t)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),
        lambda: torch.arange(40, dtype=torch.bfloat16)[::3],
        lambda: torch.arange(3, dtype=torch.int64).expand(4, 3),
        lambda: torch.arange(12, dtype=torch.float16).reshape(3, 4)[1:, 1:3],
        lambda: torch.randn(3, 2, dtype=torch.complex64).conj(),
        lambda: torch.randn(3, dtype=torch.float32, requires_grad=True) * 2,
    ],
    ids=["transposed", "strided", "expanded", "sliced", "conj", "grad"],
)
def test_non_contiguous_and_lazy_views(make: Any) -> None:
    t = make()
    out = send(t)
    assert same_bits(out, t.detach().resolve_conj())


def test_nested_structures_and_tuples() -> None:
    a, b = torch.ones(2), torch.zeros(3, dtype=torch.int32)
    out = send({"xs": [a, {"deep": (b, 5)}], "n": None, "s": "x", "raw": b"\x00"})
    assert torch.equal(out["xs"][0], a) and torch.equal(out["xs"][1]["deep"][0], b)
    assert out["xs"][1]["deep"][1] == 5 and out["n"] is None and out["s"] == "x" and out["raw"] == b"\x00"


def test_a_tensor_met_twice_is_sent_once() -> None:
    t = torch.arange(4.0)
    packed, entries = pack({"a": t, "b": [t]})
    assert len(entries) == 1 and packed == {"a": {TENSOR_KEY: "t0"}, "b": [{TENSOR_KEY: "t0"}]}
    out = send({"a": t, "b": [t]})
    assert out["a"] is out["b"][0]


def test_pack_is_zero_copy_for_contiguous_cpu_tensors() -> None:
    t = torch.arange(1000, dtype=torch.float32)
    _, [(name, dtype, shape, view)] = pack(t)
    assert (name, dtype, shape) == ("t0", "float32", (1000,))
    assert torch.frombuffer(view, dtype=torch.uint8).data_ptr() == t.data_ptr()


def test_unpack_views_the_payload() -> None:
    t = torch.arange(100, dtype=torch.float64)
    frame, header = roundtrip({"id": 1, "ok": True, "result": [t, t + 1]})
    base = torch.frombuffer(frame.payload, dtype=torch.uint8).data_ptr()
    for out in header["result"]:
        assert base <= out.data_ptr() < base + frame.payload.nbytes
    assert header["result"][1].data_ptr() - header["result"][0].data_ptr() == 832


@pytest.mark.parametrize("name", ["float64", "complex128", "int32", "bfloat16"])
def test_misaligned_payload_buffer_is_copied_to_alignment(name: str) -> None:
    t = random_tensor(DTYPE_TO_TORCH[name], (5, 3))
    out = send(t, alloc_payload=lambda n: memoryview(bytearray(n + 1))[1:])
    assert out.data_ptr() % t.element_size() == 0
    assert same_bits(out, t)


def test_unpacked_tensors_are_usable() -> None:
    out = send(torch.ones(4, 4))
    out.add_(1)
    assert float(out.sum()) == 32.0


def test_header_without_tensors_is_returned_as_is() -> None:
    frame, header = roundtrip({"id": 3, "call": "nop", "args": {"a": [1, {"b": 2}]}})
    assert header == frame.header and frame.tensors == ()


@pytest.mark.parametrize(
    "ref, match",
    [
        ({TENSOR_KEY: "nope"}, "names no row"),
        ({TENSOR_KEY: 0}, "exactly"),
        ({TENSOR_KEY: "t0", "extra": 1}, "exactly"),
        ([{"x": {TENSOR_KEY: None}}], "exactly"),
    ],
)
def test_bad_references_are_eproto(ref: Any, match: str) -> None:
    rows, views = tensor_table([("t0", "float32", [1], bytes(4))])
    dec = Decoder()
    dec.feed(b"".join(encode_frame({"id": 1, "call": "x", "args": {"r": ref}, "tensors": rows}, views)))
    frame = dec.next_frame()
    with pytest.raises(EPROTO, match=match):
        unpack(frame.header["args"], frame)


def test_bool_tensor_with_bytes_other_than_0_and_1() -> None:
    rows, views = tensor_table([("t0", "bool", [3], b"\x00\x01\x02")])
    dec = Decoder()
    dec.feed(b"".join(encode_frame({"id": 1, "ok": True, "result": {TENSOR_KEY: "t0"}, "tensors": rows}, views)))
    frame = dec.next_frame()
    with pytest.raises(EPROTO, match="bool"):
        unpack(frame.header["result"], frame)


@pytest.mark.parametrize(
    "obj, match",
    [
        ({TENSOR_KEY: "t0"}, "reserved"),
        ({1: "a"}, "not a string"),
        ({"s": {1, 2}}, "set cannot travel"),
        ({"n": 2**64}, "64-bit"),
        ({"n": -(2**64) - 1}, "64-bit"),
        ({"t": torch.ones(2).to_sparse()}, "dense"),
        ({"t": torch.ones(2, device="meta")}, "meta"),
        ({"t": torch.empty(2, dtype=torch.float4_e2m1fn_x2)}, "cannot travel"),
        ({"o": object()}, "cannot travel"),
    ],
    ids=["reserved", "int-key", "set", "big-int", "small-int", "sparse", "meta", "float4", "object"],
)
def test_pack_rejects_what_the_wire_cannot_carry(obj: Any, match: str) -> None:
    with pytest.raises(EINVAL, match=match):
        pack(obj)


def test_encode_message_refuses_its_own_key() -> None:
    with pytest.raises(EINVAL, match="tensors"):
        encode_message({"id": 1, "call": "x", "args": {}, "tensors": []})


def test_depth_limit_matches_the_decoder() -> None:
    limit = abi.DEFAULT_LIMITS.max_cbor_depth
    obj: Any = torch.ones(1)
    for _ in range(limit - 2):
        obj = [obj]
    out = send(obj)
    for _ in range(limit - 2):
        out = out[0]
    assert torch.equal(out, torch.ones(1))
    with pytest.raises(EINVAL, match="deep"):
        encode_message({"id": 1, "ok": True, "result": [obj]})


def test_pack_depth_offset() -> None:
    with pytest.raises(EINVAL, match="deep"):
        pack([[1]], max_depth=3, depth=3)
    assert pack([[1]], max_depth=4, depth=3)[0] == [[1]]


def test_scalar_subclasses_and_numpy_scalars_become_plain() -> None:
    class Level(enum.IntEnum):
        SIX = 6

    class Phase(str, enum.Enum):
        IO = "IO_WAIT"

    packed, _ = pack({"layer": Level.SIX, "phase": Phase.IO, "k": np.int64(3), "t": np.float32(0.5), "b": bytearray(b"x")})
    assert packed == {"layer": 6, "phase": "IO_WAIT", "k": 3, "t": 0.5, "b": b"x"}
    assert [type(v) for v in packed.values()] == [int, str, int, float, bytes]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 4), max_size=3), st.integers(0, 2**31)),
        max_size=5,
    )
)
def test_random_tensor_lists_round_trip(specs: list[tuple[str, list[int], int]]) -> None:
    tensors = [random_tensor(DTYPE_TO_TORCH[name], tuple(shape), seed) for name, shape, seed in specs]
    out = send(tensors)
    assert len(out) == len(tensors)
    for a, b in zip(out, tensors):
        assert same_bits(a, b)


@pytest.mark.gpu
def test_cuda_tensors_are_copied_to_host() -> None:
    t = torch.arange(10, dtype=torch.bfloat16, device="cuda")
    out = send({"t": t})["t"]
    assert out.device.type == "cpu" and same_bits(out, t.cpu())


# -- the fast paths give what the general ones give ----------------------------------------------


plain_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=6)
    | st.binary(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=5), plain_values, max_size=4), st.integers(1, 8))
def test_plain_headers_encode_as_pack_would(args: dict[str, Any], depth: int) -> None:
    """A header without tensors skips pack(); the bytes (or the error) must be the same as through pack()."""
    limits = abi.Limits(max_cbor_depth=depth)
    header = {"id": 1, "call": "x", "args": args}

    def via(encode: Any) -> Any:
        try:
            return b"".join(bytes(p) for p in encode())
        except EINVAL as err:
            return type(err)

    def through_pack() -> Any:
        packed, entries = pack(header, max_depth=depth)
        assert not entries
        return encode_frame(packed, (), limits=limits)

    assert via(lambda: encode_message(header, limits=limits)) == via(through_pack)


def test_unpack_without_tensors_returns_the_object_itself() -> None:
    frame, _ = roundtrip({"id": 3, "ok": True, "result": {"a": [1, {"b": 2}]}})
    assert unpack(frame.header["result"], frame) is frame.header["result"]
    with pytest.raises(EPROTO, match="names no row"):
        unpack({"a": [{"b": {TENSOR_KEY: "t0"}}]}, frame)


def test_unpacked_tensors_do_not_outlive_their_references() -> None:
    """unpack holds no reference cycle: the payload is freed as soon as the last tensor goes."""
    pool = PayloadPool(min_nbytes=1)
    frame, header = roundtrip({"id": 1, "ok": True, "result": {"a": torch.ones(4), "b": [torch.zeros(2)]}},
                              alloc_payload=pool)
    alive = weakref.ref(frame.payload.obj)
    a = header["result"]["a"]
    del frame, header
    assert alive() is not None and pool.idle_nbytes == 0  # `a` still views the payload
    del a
    assert alive() is None and pool.idle_nbytes > 0


# -- the payload pool ---------------------------------------------------------------------------


def test_pool_reuses_a_buffer_once_its_tensors_are_gone() -> None:
    pool = PayloadPool(min_nbytes=1024)
    t = torch.arange(4096, dtype=torch.float32)
    held = send({"t": t}, alloc_payload=pool)["t"]
    assert pool.allocated == 1 and torch.equal(held, t)
    send({"t": t + 1}, alloc_payload=pool)  # `held` still views the first buffer: a second one is made
    assert (pool.allocated, pool.reused) == (2, 0)
    out = send({"t": t + 2}, alloc_payload=pool)["t"]  # the second buffer's tensor is gone: reused
    assert (pool.allocated, pool.reused) == (2, 1)
    assert torch.equal(held, t) and torch.equal(out, t + 2)
    assert held.data_ptr() != out.data_ptr()


def test_pool_buffers_are_aligned_and_small_payloads_are_bytearrays() -> None:
    pool = PayloadPool(min_nbytes=1024)
    assert type(pool(100)) is bytearray and pool.allocated == 0
    for n in (1024, 5000, 1 << 20):
        buf = pool(n)
        view = memoryview(buf)
        assert view.nbytes == n and not view.readonly
        assert torch.frombuffer(view, dtype=torch.uint8).data_ptr() % 64 == 0


def test_pool_keeps_at_most_its_idle_limit() -> None:
    pool = PayloadPool(min_nbytes=1024, max_idle_nbytes=3 << 20)
    bufs = [pool(1 << 20) for _ in range(5)]
    del bufs
    assert pool.idle_nbytes == 3 << 20
    buf = pool(1 << 20)
    assert pool.reused == 1 and pool.idle_nbytes == 2 << 20
    del buf


def test_pool_never_holds_a_payload_larger_than_its_idle_limit() -> None:
    pool = PayloadPool(min_nbytes=1024, max_idle_nbytes=1 << 20)
    buf = pool(8 << 20)
    del buf
    assert not pool._returned  # dropped when it died, not held until the next call
    assert pool.idle_nbytes == 0


def test_pool_takes_buffers_back_from_other_threads() -> None:
    pool = PayloadPool(min_nbytes=1024)
    bufs = [pool(1 << 16) for _ in range(8)]
    threads = [threading.Thread(target=bufs.pop) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert pool.idle_nbytes == 8 << 16
    pool(1 << 16)
    assert pool.reused == 1


def _joined(parts: list[Any]) -> bytes:
    return b"".join(bytes(p) for p in parts)


REPLY_CASES = [
    {}, None, 3, -(2**64), 2**64 - 1, "text", b"raw", 1.5, [1, [2, {"a": None}]], {"nested": {"x": [True, False]}},
    {"t": torch.arange(4)}, [torch.ones(2)], (1, 2), {"k": (1, 2)}, np.int64(5), 2**64,
]


@pytest.mark.parametrize("result", REPLY_CASES, ids=repr)
@pytest.mark.parametrize("flags", [0, 1])
def test_encode_reply_is_encode_message(result: Any, flags: int) -> None:
    """The fast path of replies makes the same bytes as the general one, and raises the same errors."""
    header = {"id": 300, "ok": True, "result": result}
    try:
        expected = _joined(encode_message(header, flags=flags))
    except EINVAL as err:
        with pytest.raises(EINVAL, match=re.escape(err.message)):
            encode_reply(300, result, flags=flags)
        return
    assert _joined(encode_reply(300, result, flags=flags)) == expected


@pytest.mark.parametrize("args", [{}, {"a": 1, "b": [1, "x"]}, {"t": torch.zeros(3)}, {"k": (1,)}, {"bad": 2**64}],
                         ids=repr)
def test_encode_request_is_encode_message(args: dict[str, Any]) -> None:
    header = {"id": 70000, "call": "echo", "args": args}
    try:
        expected = _joined(encode_message(header))
    except EINVAL as err:
        with pytest.raises(EINVAL, match=re.escape(err.message)):
            encode_request(70000, "echo", args)
        return
    assert _joined(encode_request(70000, "echo", args)) == expected


def test_encode_reply_deep_results_follow_the_depth_limit() -> None:
    deep: Any = {}
    for _ in range(abi.DEFAULT_LIMITS.max_cbor_depth - 2):  # the header is depth 1, the result 2
        deep = {"d": deep}
    assert _joined(encode_reply(1, deep)) == _joined(encode_message({"id": 1, "ok": True, "result": deep}))
    with pytest.raises(EINVAL, match="deep"):
        encode_reply(1, {"d": deep})
