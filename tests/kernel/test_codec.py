"""The sans-IO codec: valid frames survive any split of the stream, everything else is a ProtocolError."""

from __future__ import annotations

import asyncio
import gc
import itertools
import re
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import cbor2
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from djinn.kernel import abi, codec
from djinn.kernel.codec import (
    ALIGN,
    DTYPES,
    FLAG_MORE,
    PREFIX,
    PREFIX_NBYTES,
    Decoder,
    Frame,
    FrameTooLarge,
    ProtocolError,
    _check_envelope,
    check_header,
    encode_call,
    encode_frame,
    encode_laid_out,
    encode_result,
    envelope_frame,
    recv_frame,
    send_frame,
    tensor_table,
)
from djinn.kernel.errors import E2BIG, EINVAL, EPROTO

STAGINGS = (PREFIX_NBYTES, 64, 1000, 64 << 10)
SMALL = abi.Limits(max_header_nbytes=4096, max_payload_nbytes=1 << 16, max_tensors=8, max_cbor_depth=8)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Spy:
    """alloc_payload that records every request."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.buffers: list[bytearray] = []

    def __call__(self, nbytes: int) -> bytearray:
        self.calls.append(nbytes)
        self.buffers.append(bytearray(nbytes))
        return self.buffers[-1]


def frame_bytes(header: dict[str, Any], tensors: list[tuple[str, str, list[int], bytes]] = (), flags: int = 0) -> bytes:
    rows, views = tensor_table(tensors)
    if rows:
        header = {**header, "tensors": rows}
    return b"".join(encode_frame(header, views, flags))


def raw_frame(header: Any, payload: bytes = b"", *, magic: bytes = abi.MAGIC, version: int = abi.PROTOCOL_VERSION,
              flags: int = 0, reserved: int = 0, header_nbytes: int | None = None,
              payload_nbytes: int | None = None) -> bytes:
    encoded = header if isinstance(header, bytes) else cbor2.dumps(header)
    hn = len(encoded) if header_nbytes is None else header_nbytes
    pn = len(payload) if payload_nbytes is None else payload_nbytes
    return PREFIX.pack(magic, version, flags, reserved, hn, pn) + encoded + payload


def decode_all(data: bytes, **kw: Any) -> list[Frame]:
    dec = Decoder(**kw)
    dec.feed(data)
    frames = []
    while (f := dec.next_frame()) is not None:
        frames.append(f)
    dec.feed_eof()
    return frames


def rejects(data: bytes, match: str | None = None, **kw: Any) -> ProtocolError:
    dec = Decoder(**kw)
    with pytest.raises(ProtocolError, match=match) as info:
        dec.feed(data)
        dec.feed_eof()
    return info.value


REQ = {"id": 7, "call": "forward", "args": {"session": "s-1", "pause_at": 6}}


# -- valid frames ---------------------------------------------------------------------


def test_request_round_trip() -> None:
    [f] = decode_all(frame_bytes(REQ))
    assert f.header == REQ and f.id == 7 and f.flags == 0 and not f.more
    assert f.tensors == () and f.payload.nbytes == 0


def test_reply_with_tensors_round_trip() -> None:
    a, b = bytes(range(12)), b"\x01" * 3
    data = frame_bytes({"id": 1, "ok": True, "result": {"x": {"$tensor": "a"}}},
                       [("a", "float32", [3], a), ("e", "int64", [0, 4], b""), ("b", "uint8", [3], b)], FLAG_MORE)
    [f] = decode_all(data)
    assert f.more
    assert [(s.name, s.offset, s.nbytes) for s in f.tensors] == [("a", 0, 12), ("e", 64, 0), ("b", 64, 3)]
    assert bytes(f.segment(f.tensors[0])) == a and bytes(f.segment(f.tensors[2])) == b
    assert f.payload.nbytes == 67


def test_padding_is_zero_and_buffers_are_not_copied() -> None:
    big = bytearray(b"\xab" * 1000)
    rows, views = tensor_table([("a", "uint8", [5], b"12345"), ("b", "uint8", [1000], big)])
    parts = encode_frame({"id": 1, "ok": True, "result": None, "tensors": rows}, views)
    assert isinstance(parts[-1], memoryview) and parts[-1].obj is big
    assert parts[2] == bytes(ALIGN - 5)
    assert rows[1]["offset"] == ALIGN


def test_trailing_empty_tensor_sets_payload_length() -> None:
    data = frame_bytes({"id": 1, "ok": True, "result": None}, [("a", "uint8", [3], b"abc"), ("z", "float32", [0], b"")])
    [f] = decode_all(data)
    assert f.payload.nbytes == ALIGN and f.tensors[1].offset == ALIGN


tensor_rows = st.lists(
    st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 5), max_size=3)), max_size=4
)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def frames(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[str, str, list[int], bytes]], int]:
    rid = draw(st.integers(0, 2**64 - 1))
    kind = draw(st.sampled_from(["request", "reply", "error"]))
    if kind == "request":
        header: dict[str, Any] = {"id": rid, "call": draw(st.text(max_size=10)), "args": draw(st.dictionaries(st.text(max_size=5), values, max_size=3))}
        flags = 0
    elif kind == "reply":
        header = {"id": rid, "ok": True, "result": draw(values)}
        flags = draw(st.sampled_from([0, FLAG_MORE]))
    else:
        header = {"id": rid, "ok": False, "error": {"errno": "EINVAL", "code": 22, "message": draw(st.text(max_size=10))}}
        flags = 0
    tensors = []
    for i, (dtype, shape) in enumerate(draw(tensor_rows)):
        n = DTYPES[dtype]
        for d in shape:
            n *= d
        tensors.append((f"t{i}", dtype, shape, draw(st.binary(min_size=n, max_size=n))))
    return header, tensors, flags


def check_frame(f: Frame, header: dict[str, Any], tensors: list[tuple[str, str, list[int], bytes]], flags: int) -> None:
    assert f.flags == flags
    got = dict(f.header)
    got.pop("tensors", None)
    assert got == header
    assert [(s.name, s.dtype, list(s.shape)) for s in f.tensors] == [t[:3] for t in tensors]
    for spec, t in zip(f.tensors, tensors):
        assert bytes(f.segment(spec)) == t[3]


def _check_fed_in_pieces(msgs: list[Any], cuts: list[int], staging: int) -> None:
    """Feed the frames of `msgs`, back to back, cut at `cuts`: every frame comes out whole and exact."""
    stream = b"".join(frame_bytes(*m) for m in msgs)
    dec = Decoder(staging_nbytes=staging)
    got: list[Frame] = []
    for lo, hi in zip([0, *cuts], [*cuts, len(stream)]):
        dec.feed(stream[lo:hi])
        while (f := dec.next_frame()) is not None:
            got.append(f)
    dec.feed_eof()
    assert len(got) == len(msgs)
    for f, m in zip(got, msgs):
        check_frame(f, *m)


@FUZZ
@given(st.lists(frames(), min_size=1, max_size=3), st.data(), st.sampled_from(STAGINGS))
def test_any_split_of_frames_back_to_back(msgs: list[Any], data: st.DataObject, staging: int) -> None:
    nbytes = sum(len(frame_bytes(*m)) for m in msgs)
    _check_fed_in_pieces(msgs, sorted(data.draw(st.lists(st.integers(0, nbytes), max_size=8))), staging)


@FUZZ
@given(st.lists(frames(), min_size=1, max_size=2), st.sampled_from(STAGINGS))
def test_any_frames_one_byte_at_a_time(msgs: list[Any], staging: int) -> None:
    nbytes = sum(len(frame_bytes(*m)) for m in msgs)
    _check_fed_in_pieces(msgs, list(range(1, nbytes)), staging)


@pytest.mark.parametrize("staging", STAGINGS)
def test_one_byte_at_a_time(staging: int) -> None:
    msgs = [
        (REQ, [], 0),
        ({"id": 2, "ok": True, "result": [1, "x"]}, [("a", "bfloat16", [2, 3], bytes(range(12))), ("b", "bool", [], b"\x01")], FLAG_MORE),
        ({"id": 3, "ok": True, "result": None}, [("c", "int8", [200], bytes(200))], 0),
    ]
    stream = b"".join(frame_bytes(*m) for m in msgs)
    dec = Decoder(staging_nbytes=staging)
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        if (f := dec.next_frame()) is not None:
            got.append(f)
    assert len(got) == 3
    for f, m in zip(got, msgs):
        check_frame(f, *m)


def test_recv_into_path_with_short_writes() -> None:
    stream = frame_bytes(REQ) * 3 + frame_bytes({"id": 1, "ok": True, "result": 1}, [("a", "uint8", [5000], b"x" * 5000)])
    dec = Decoder(staging_nbytes=100)
    pos, got = 0, []
    while pos < len(stream):
        buf = dec.get_buffer(-1)
        assert len(buf) > 0
        n = min(len(buf), 37, len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        while (f := dec.next_frame()) is not None:
            got.append(f)
    assert [f.id for f in got] == [7, 7, 7, 1]


def test_large_payload_is_received_in_place() -> None:
    nbytes = 16 << 20
    spy = Spy()
    header = {"id": 1, "ok": True, "result": {"$tensor": "w"},
              "tensors": [{"name": "w", "dtype": "float32", "shape": [nbytes // 4], "offset": 0, "nbytes": nbytes}]}
    head = raw_frame(header, payload_nbytes=nbytes)
    dec = Decoder(alloc_payload=spy)
    dec.feed(head)
    assert spy.calls == [nbytes]
    payload = bytes([7]) * nbytes
    pos = 0
    while pos < nbytes:
        buf = dec.get_buffer(-1)
        assert buf.obj is spy.buffers[0]
        n = min(len(buf), 1 << 20)
        buf[:n] = payload[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
    f = dec.next_frame()
    assert f is not None and f.payload.obj is spy.buffers[0] and f.payload.nbytes == nbytes
    assert spy.buffers[0][-1] == 7


def test_in_place_says_when_the_buffer_is_one_frame_s_own() -> None:
    data = frame_bytes({"id": 1, "ok": True, "result": None}, [("a", "uint8", [100_000], bytes(100_000))])
    dec = Decoder(staging_nbytes=4096)
    assert not dec.in_place
    dec.feed(data[:4096])
    assert dec.in_place and len(dec.get_buffer()) == len(data) - 4096  # exactly the rest of the payload
    dec.feed(data[4096:])
    assert not dec.in_place and dec.next_frame() is not None


def test_headers_of_different_lengths_back_to_back() -> None:
    """The decoder reuses one CBOR stream: a short header after a long one must not see its tail."""
    long = {"id": 1, "call": "x", "args": {"pad": "y" * 500}}
    stream = frame_bytes(long) + frame_bytes(REQ) + raw_frame(cbor2.dumps(REQ)[:-1]) + cbor2.dumps(REQ)[-1:]
    dec = Decoder()
    with pytest.raises(ProtocolError, match="not acceptable CBOR"):
        dec.feed(stream)
    dec = Decoder()
    dec.feed(frame_bytes(long) + frame_bytes(REQ))
    assert dec.next_frame().header == long and dec.next_frame().header == REQ


def test_staged_part_of_payload_is_copied_once_then_direct() -> None:
    spy = Spy()
    data = frame_bytes({"id": 1, "ok": True, "result": None}, [("a", "uint8", [100_000], bytes(100_000))])
    dec = Decoder(alloc_payload=spy, staging_nbytes=4096)
    dec.feed(data[:4096])
    assert len(spy.calls) == 1
    assert dec.get_buffer().obj is spy.buffers[0]
    dec.feed(data[4096:])
    assert dec.next_frame().payload.obj is spy.buffers[0]


def test_alloc_payload_may_return_a_larger_buffer() -> None:
    data = frame_bytes({"id": 1, "ok": True, "result": None}, [("a", "uint8", [10], b"0123456789")])
    [f] = decode_all(data, alloc_payload=lambda n: memoryview(bytearray(n + 100)))
    assert bytes(f.payload) == b"0123456789"


def test_alloc_payload_must_be_writable() -> None:
    dec = Decoder(alloc_payload=lambda n: bytes(n))
    with pytest.raises(ValueError):
        dec.feed(frame_bytes({"id": 1, "ok": True, "result": None}, [("a", "uint8", [1], b"x")]))
    assert dec.dead


# -- malformed input ---------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(STAGINGS))
def test_arbitrary_bytes_only_raise_protocol_error(data: bytes, staging: int) -> None:
    dec = Decoder(SMALL, staging_nbytes=staging)
    try:
        dec.feed(data)
        while dec.next_frame() is not None:
            pass
        dec.feed_eof()
    except ProtocolError:
        assert dec.dead


@FUZZ
@given(frames(), st.data())
def test_corrupted_frames_only_raise_protocol_error(msg: Any, data: st.DataObject) -> None:
    stream = bytearray(frame_bytes(*msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] = data.draw(st.integers(0, 255))
    dec = Decoder(SMALL)
    try:
        dec.feed(bytes(stream))
        while dec.next_frame() is not None:
            pass
        dec.feed_eof()
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(min_size=1, max_size=200), st.integers(0, 64))
def test_valid_prefix_then_garbage(header: bytes, payload_nbytes: int) -> None:
    dec = Decoder(SMALL)
    try:
        dec.feed(raw_frame(header, bytes(payload_nbytes)))
        dec.next_frame()
    except ProtocolError:
        pass


row_values = st.one_of(values, st.lists(st.integers(-2, 70), max_size=3), st.sampled_from(sorted(DTYPES)))
fuzz_rows = st.lists(
    st.dictionaries(st.sampled_from(["name", "dtype", "shape", "offset", "nbytes", "x"]), row_values, max_size=6)
    | values,
    max_size=3,
)
fuzz_headers = st.dictionaries(
    st.sampled_from(["id", "call", "args", "ok", "result", "error", "tensors"]),
    st.one_of(values, fuzz_rows, st.dictionaries(st.sampled_from(["errno", "code", "message"]), values)),
    max_size=7,
)


@FUZZ
@given(fuzz_headers, st.integers(0, 300), st.sampled_from([0, FLAG_MORE]))
def test_random_headers_only_raise_protocol_error(header: dict[str, Any], payload_nbytes: int, flags: int) -> None:
    dec = Decoder(SMALL)
    try:
        dec.feed(raw_frame(header, bytes(payload_nbytes), flags=flags))
    except ProtocolError:
        return
    frame = dec.next_frame()
    assert frame is not None and frame.header == header


def test_bad_magic() -> None:
    rejects(raw_frame(REQ, magic=b"DJNX"), "magic")


def test_bad_magic_is_seen_before_a_whole_prefix() -> None:
    rejects(b"GET / HTTP/1.1\r\n", "magic")


def test_bad_version_names_both() -> None:
    err = rejects(raw_frame(REQ, version=2), "version 2.*version 1")
    assert err.details == {"peer_version": 2, "version": 1}


@pytest.mark.parametrize("flags", [0x02, 0x04, 0x80, 0x03])
def test_unknown_flags(flags: int) -> None:
    rejects(raw_frame(REQ, flags=flags), "flags")


def test_reserved_must_be_zero() -> None:
    rejects(raw_frame(REQ, reserved=1), "reserved")


def test_zero_header_length() -> None:
    rejects(raw_frame(b"", header_nbytes=0), "header length is 0")


def test_header_length_longer_than_the_map() -> None:
    rejects(raw_frame(cbor2.dumps(REQ) + b"\x00"), "follow the header")


def test_header_length_shorter_than_the_map() -> None:
    encoded = cbor2.dumps(REQ)
    rejects(raw_frame(encoded[:-1]) + encoded[-1:], "CBOR")


def test_payload_length_shorter_than_the_table() -> None:
    header = {**REQ, "tensors": [{"name": "a", "dtype": "uint8", "shape": [10], "offset": 0, "nbytes": 10}]}
    rejects(raw_frame(header, bytes(10), payload_nbytes=9), "outside")


@pytest.mark.parametrize(
    "limits_kw, frame_kw",
    [
        ({"max_header_nbytes": 100}, {"header_nbytes": 101}),
        ({"max_payload_nbytes": 1000}, {"payload_nbytes": 1001}),
        ({}, {"header_nbytes": 2**32 - 1}),
        ({}, {"payload_nbytes": 2**64 - 1}),
    ],
)
def test_over_the_limit_is_rejected_before_allocation(limits_kw: dict[str, int], frame_kw: dict[str, int]) -> None:
    spy = Spy()
    err = rejects(raw_frame(REQ, **frame_kw)[:PREFIX_NBYTES], "exceeds", limits=abi.Limits(**limits_kw), alloc_payload=spy)
    assert isinstance(err, FrameTooLarge) and isinstance(err, E2BIG) and err.errno == "E2BIG"
    assert spy.calls == []


def test_too_many_tensors_rejected_before_allocation() -> None:
    spy = Spy()
    rows = [{"name": f"t{i}", "dtype": "uint8", "shape": [1], "offset": 64 * i, "nbytes": 1} for i in range(9)]
    err = rejects(raw_frame({**REQ, "tensors": rows}, payload_nbytes=64 * 8 + 1), "9 tensors", limits=SMALL, alloc_payload=spy)
    assert isinstance(err, FrameTooLarge)
    assert spy.calls == []


def test_truncated_frame_waits_then_eof_is_an_error() -> None:
    data = frame_bytes(REQ, [("a", "uint8", [100], bytes(100))])
    for cut in (0, 5, PREFIX_NBYTES, PREFIX_NBYTES + 3, len(data) - 1):
        dec = Decoder()
        dec.feed(data[:cut])
        assert dec.next_frame() is None
        if cut:
            with pytest.raises(ProtocolError, match="middle of a frame"):
                dec.feed_eof()
        else:
            dec.feed_eof()


@pytest.mark.parametrize(
    "encoded, match",
    [
        (b"\xff", "CBOR"),
        (b"\x1c", "CBOR"),
        (b"\x61\xff", "CBOR"),
        (bytes.fromhex("a3626964016463616c6c6178626964"), "CBOR"),
        (b"\xa1", "CBOR"),
    ],
    ids=["break", "reserved-ai", "bad-utf8", "truncated-map", "empty-map-body"],
)
def test_cbor_garbage(encoded: bytes, match: str) -> None:
    rejects(raw_frame(encoded), match)


def nested(depth: int) -> Any:
    inner: Any = 1
    for _ in range(depth):
        inner = [inner]
    return inner


def test_cbor_depth_limit() -> None:
    limit = abi.DEFAULT_LIMITS.max_cbor_depth
    [f] = decode_all(raw_frame({"id": 1, "call": "x", "args": {"a": nested(limit - 2)}}))
    assert f.header["args"]["a"] == nested(limit - 2)
    rejects(raw_frame({"id": 1, "call": "x", "args": {"a": nested(limit - 1)}}), "depth")


def test_duplicate_keys_top_level() -> None:
    encoded = b"\xa4" + cbor2.dumps("id") + b"\x01" + cbor2.dumps("call") + cbor2.dumps("x") + cbor2.dumps("args") + b"\xa0" + cbor2.dumps("id") + b"\x02"
    rejects(raw_frame(encoded), "[Dd]uplicate")


def test_duplicate_keys_nested() -> None:
    args = b"\xa2" + cbor2.dumps("k") + b"\x01" + cbor2.dumps("k") + b"\x02"
    encoded = b"\xa3" + cbor2.dumps("id") + b"\x01" + cbor2.dumps("call") + cbor2.dumps("x") + cbor2.dumps("args") + args
    rejects(raw_frame(encoded), "[Dd]uplicate")


@pytest.mark.parametrize(
    "value",
    [cbor2.CBORTag(1, 0), cbor2.CBORTag(2, b"\x01"), cbor2.CBORTag(35, "a+"), cbor2.CBORTag(258, [1]), cbor2.CBORTag(9999, 1), cbor2.CBORTag(55799, 1)],
    ids=lambda t: f"tag{t.tag}",
)
def test_tags_are_rejected(value: Any) -> None:
    rejects(raw_frame({"id": 1, "call": "x", "args": {"v": value}}), "tags")


def test_shared_reference_cycles_are_rejected() -> None:
    body = cbor2.dumps({"id": 1, "call": "x"})[1:]
    encoded = b"\xa3" + body + cbor2.dumps("args") + bytes.fromhex("d81ca16161d81d00")
    rejects(raw_frame(encoded), "tags")


@pytest.mark.parametrize("key", [1, b"k", 1.5])
def test_non_text_map_keys(key: Any) -> None:
    encoded = b"\xa3" + cbor2.dumps({"id": 1, "call": "x"})[1:] + cbor2.dumps("args") + b"\xa1" + cbor2.dumps(key) + b"\x01"
    rejects(raw_frame(encoded), "CBOR")


@pytest.mark.parametrize(
    "header, match",
    [
        ([1, 2], "must be a CBOR map"),
        ("hello", "must be a CBOR map"),
        ({"call": "x", "args": {}}, "'id'"),
        ({"id": True, "call": "x", "args": {}}, "'id'"),
        ({"id": -1, "call": "x", "args": {}}, "'id'"),
        ({"id": 1.0, "call": "x", "args": {}}, "'id'"),
        ({"id": "1", "call": "x", "args": {}}, "'id'"),
        ({"id": 1}, "needs 'call'"),
        ({"id": 1, "call": "x", "ok": True, "args": {}}, "not both"),
        ({"id": 1, "call": 5, "args": {}}, "'call'"),
        ({"id": 1, "call": "x"}, "'args'"),
        ({"id": 1, "call": "x", "args": [1]}, "'args'"),
        ({"id": 1, "ok": 1, "result": None}, "'ok'"),
        ({"id": 1, "ok": True}, "'result'"),
        ({"id": 1, "ok": False}, "'error'"),
        ({"id": 1, "ok": False, "error": {"errno": "EINVAL", "message": "m"}}, "'error'"),
        ({"id": 1, "ok": False, "error": "EINVAL"}, "'error'"),
    ],
)
def test_bad_envelopes(header: Any, match: str) -> None:
    spy = Spy()
    rejects(raw_frame(header), match, alloc_payload=spy)


@FUZZ
@given(fuzz_headers, st.integers(0, 300), st.sampled_from([0, FLAG_MORE]))
def test_fast_path_agrees_with_the_full_envelope_check(header: dict[str, Any], payload_nbytes: int, flags: int) -> None:
    """check_header's fast path accepts a header only where the full rules accept it, with the same rows."""
    def outcome(check: Any) -> Any:
        try:
            return check(header, flags, payload_nbytes, SMALL, ProtocolError, FrameTooLarge)
        except ProtocolError as err:
            return type(err)

    assert outcome(check_header) == outcome(_check_envelope)


def test_more_only_on_successful_replies() -> None:
    rejects(raw_frame(REQ, flags=FLAG_MORE), "MORE")
    error = {"id": 1, "ok": False, "error": {"errno": "EIO", "code": 5, "message": "m"}}
    rejects(raw_frame(error, flags=FLAG_MORE), "MORE")
    [f] = decode_all(raw_frame({"id": 1, "ok": True, "result": 1}, flags=FLAG_MORE))
    assert f.more


def row(**kw: Any) -> dict[str, Any]:
    return {"name": "a", "dtype": "float32", "shape": [2, 2], "offset": 0, "nbytes": 16, **kw}


@pytest.mark.parametrize(
    "rows, payload_nbytes, match",
    [
        ("x", 16, "array of rows"),
        ([[1]], 16, "exactly the keys"),
        ([row(extra=1)], 16, "exactly the keys"),
        ([{k: v for k, v in row().items() if k != "nbytes"}], 16, "exactly the keys"),
        ([row(name="")], 16, "'name'"),
        ([row(name=3)], 16, "'name'"),
        ([row(), row(offset=64)], 80, "twice"),
        ([row(dtype="float128")], 16, "unknown dtype"),
        ([row(dtype=4)], 16, "unknown dtype"),
        ([row(shape=[-2, -2])], 16, "shape"),
        ([row(shape=[2.0, 2])], 16, "shape"),
        ([row(shape=[True, 4])], 16, "shape"),
        ([row(shape="22")], 16, "shape"),
        ([row(shape=[1] * 65, nbytes=4)], 16, "shape"),
        ([row(shape=[0, 2**62, 4], nbytes=0)], 16, "too large"),
        ([row(offset=8)], 24, "multiple of 64"),
        ([row(offset=-64)], 16, "multiple of 64"),
        ([row(offset="0")], 16, "multiple of 64"),
        ([row(nbytes=12)], 16, "nbytes"),
        ([row(nbytes=16.0)], 16, "nbytes"),
        ([row()], 15, "outside"),
        ([row(offset=64)], 79, "outside"),
        ([row(shape=[0], nbytes=0, offset=128)], 64, "outside"),
        ([row(shape=[32], nbytes=128), row(name="b", offset=64)], 128, "overlaps"),
        ([row(name="b", offset=64, shape=[32], nbytes=128), row(offset=128)], 192, "overlaps"),
    ],
)
def test_bad_tensor_tables(rows: Any, payload_nbytes: int, match: str) -> None:
    spy = Spy()
    rejects(raw_frame({**REQ, "tensors": rows}, bytes(payload_nbytes)), match, alloc_payload=spy)
    assert spy.calls == []


def test_overlap_ignores_empty_segments() -> None:
    rows = [row(shape=[2], nbytes=8), row(name="e", shape=[0], nbytes=0)]
    [f] = decode_all(raw_frame({**REQ, "tensors": rows}, bytes(8)))
    assert [s.name for s in f.tensors] == ["a", "e"]


def test_decoder_stays_dead() -> None:
    dec = Decoder()
    with pytest.raises(ProtocolError):
        dec.feed(b"XXXX")
    assert dec.dead
    for call in (lambda: dec.feed(frame_bytes(REQ)), dec.next_frame, dec.get_buffer, dec.feed_eof, lambda: dec.buffer_updated(0)):
        with pytest.raises(ProtocolError, match="dead"):
            call()


def test_a_dead_decoder_is_freed_without_the_cyclic_collector() -> None:
    """A decoder that raised is in no reference cycle (its traceback would hold it): it goes as soon as the
    last reference does. A cycle around its staging buffer, a BytesIO export, crashes CPython 3.12.0/3.12.1's
    collector (gh-111211) and, on 3.11, makes it print an ignored BufferError."""
    gc.collect()
    gc.disable()
    try:
        for kill in (lambda d: d.feed(b"XXXX"), lambda d: (d.feed(frame_bytes(REQ)[:5]), d.feed_eof())):
            others = {id(o) for o in gc.get_objects() if type(o) is Decoder}
            dec = Decoder()
            with pytest.raises(ProtocolError) as caught:
                kill(dec)
            del caught  # the test's own hold on the traceback
            assert dec.dead
            del dec  # freed by reference counting alone:
            assert not [o for o in gc.get_objects() if type(o) is Decoder and id(o) not in others]
    finally:
        gc.enable()


def test_protocol_error_is_eproto() -> None:
    err = rejects(b"XXXX")
    assert isinstance(err, EPROTO) and err.to_wire()["errno"] == "EPROTO"


def test_frames_before_an_error_are_dropped() -> None:
    dec = Decoder()
    with pytest.raises(ProtocolError):
        dec.feed(frame_bytes(REQ) + b"XXXXXXXXXXXXXXXXXXXXXXXX")
    with pytest.raises(ProtocolError):
        dec.next_frame()


# -- the encoder refuses what the decoder would refuse ------------------------------


def test_encode_rejects_unknown_flags() -> None:
    with pytest.raises(EINVAL, match="flags"):
        encode_frame({"id": 1, "ok": True, "result": None}, (), 0x02)


def test_encode_rejects_bad_envelope() -> None:
    with pytest.raises(EINVAL, match="'id'"):
        encode_frame({"call": "x", "args": {}})
    with pytest.raises(EINVAL, match="MORE"):
        encode_frame(REQ, (), FLAG_MORE)


def test_encode_checks_buffers_against_table() -> None:
    rows, views = tensor_table([("a", "float32", [2], bytes(8))])
    header = {**REQ, "tensors": rows}
    with pytest.raises(EINVAL, match="buffers"):
        encode_frame(header, [])
    with pytest.raises(EINVAL, match="holds 4 bytes"):
        encode_frame(header, [bytes(4)])
    bad_rows, _ = tensor_table([("a", "float32", [3], bytes(8))])
    with pytest.raises(EINVAL, match="nbytes"):
        encode_frame({**REQ, "tensors": bad_rows}, views)
    with pytest.raises(EINVAL, match="rows"):
        encode_frame({**REQ, "tensors": [1]}, views)


def test_encode_rejects_non_contiguous_buffer() -> None:
    with pytest.raises(EINVAL, match="contiguous"):
        tensor_table([("a", "uint8", [2], memoryview(b"abcd")[::2])])


def test_encode_limits() -> None:
    with pytest.raises(E2BIG, match="header"):
        encode_frame({**REQ, "args": {"blob": bytes(5000)}}, limits=SMALL)
    rows, views = tensor_table([("a", "uint8", [70000], bytes(70000))])
    with pytest.raises(E2BIG, match="payload"):
        encode_frame({**REQ, "tensors": rows}, views, limits=SMALL)
    rows, views = tensor_table([(f"t{i}", "uint8", [1], b"x") for i in range(9)])
    with pytest.raises(E2BIG, match="tensors"):
        encode_frame({**REQ, "tensors": rows}, views, limits=SMALL)


def test_encode_rejects_unencodable_header() -> None:
    with pytest.raises(EINVAL, match="CBOR"):
        encode_frame({**REQ, "args": {"x": object()}})


def test_encode_accepts_table_in_any_order() -> None:
    rows = [row(name="b", offset=64), row(name="a", offset=0)]
    parts = encode_frame({**REQ, "tensors": rows}, [b"B" * 16, b"A" * 16])
    [f] = decode_all(b"".join(parts))
    assert bytes(f.payload[:16]) == b"A" * 16 and bytes(f.payload[64:]) == b"B" * 16


# -- blocking helpers and the asyncio shell -----------------------------------------------


def test_send_and_recv_over_a_socketpair() -> None:
    a, b = socket.socketpair()
    try:
        tensors = [(f"t{i}", "uint8", [3], b"abc") for i in range(700)] + [("big", "uint8", [3 << 20], bytes(3 << 20))]
        rows, views = tensor_table(tensors)
        parts = encode_frame({"id": 9, "ok": True, "result": None, "tensors": rows}, views, limits=abi.Limits(max_tensors=1024))
        assert len(parts) > 1024
        sender = threading.Thread(target=lambda: (send_frame(a, parts), send_frame(a, encode_frame(REQ))))
        sender.start()
        dec = Decoder()
        f1 = recv_frame(b, dec)
        f2 = recv_frame(b, dec)
        sender.join()
        assert f1.id == 9 and len(f1.tensors) == 701 and bytes(f1.segment(f1.tensors[699])) == b"abc"
        assert f2.header == REQ
        a.close()
        with pytest.raises(ConnectionResetError):
            recv_frame(b, dec)
    finally:
        a.close()
        b.close()


def test_recv_frame_close_mid_frame() -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(frame_bytes(REQ)[:10])
        a.close()
        with pytest.raises(ProtocolError):
            recv_frame(b, Decoder())
    finally:
        b.close()


class Collect(asyncio.BufferedProtocol):
    def __init__(self, want: int, done: asyncio.Future[list[Frame]]) -> None:
        self.decoder = Decoder(staging_nbytes=1024)
        self.frames: list[Frame] = []
        self.want = want
        self.done = done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.decoder.buffer_updated(nbytes)
        while (f := self.decoder.next_frame()) is not None:
            self.frames.append(f)
        if len(self.frames) == self.want and not self.done.done():
            self.done.set_result(self.frames)


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_buffered_protocol_over_a_real_socket(loop_factory: Any) -> None:
    rows, views = tensor_table([("w", "uint8", [5 << 20], bytes(range(256)) * (5 << 12))])
    big = encode_frame({"id": 2, "ok": True, "result": {"$tensor": "w"}, "tensors": rows}, views)

    async def main() -> list[Frame]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Frame]] = loop.create_future()
        a, b = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(lambda: Collect(3, done), b)
        wt, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        wt.writelines(encode_frame(REQ))
        wt.writelines(big)
        wt.writelines(encode_frame(REQ))
        frames = await asyncio.wait_for(done, 10)
        wt.close()
        transport.close()
        return frames

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        frames = runner.run(main())
    assert [f.id for f in frames] == [7, 2, 7]
    assert bytes(frames[1].payload) == bytes(range(256)) * (5 << 12)


# -- the worked example in docs/PROTOCOL.md decodes as described ------------------------


def test_protocol_doc_example_decodes() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    block = re.search(r"<!-- example-frame -->\s*```\n(.*?)```", doc, re.S)
    assert block, "docs/PROTOCOL.md lost its worked example"
    data = bytes.fromhex("".join(line.split("|")[0].split(":", 1)[1] for line in block.group(1).splitlines() if ":" in line))
    [f] = decode_all(data)
    assert f.header["call"] == "echo"
    [spec] = f.tensors
    assert (spec.name, spec.dtype, spec.shape, spec.offset, spec.nbytes) == ("x", "float16", (1, 2), 0, 4)
    assert struct.unpack("<2e", f.segment(spec)) == (1.0, -2.0)


def test_no_tag_number_gets_through() -> None:
    body = b"\xa3" + cbor2.dumps({"id": 1, "call": "x"})[1:] + cbor2.dumps("args") + b"\xa1" + cbor2.dumps("v")
    leaked = []
    for payload in (b"\x00", b"\x61a"):
        for tag in [*range(1024), *range(1024, 1 << 16, 61), 43000, 55799, 2**32 - 1, 2**32, 2**63, 2**64 - 1]:
            head = cbor2.dumps(cbor2.CBORTag(tag, None))[:-1]
            try:
                Decoder(staging_nbytes=PREFIX_NBYTES).feed(raw_frame(body + head + payload))
            except ProtocolError:
                continue
            leaked.append(tag)
    assert leaked == []


# -- the hand-written envelopes of the usual frames -----------------------------------

EDGE_IDS = (0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1)


@FUZZ
@given(rid=st.integers(0, 2**64 - 1) | st.sampled_from(EDGE_IDS), result=values, more=st.booleans())
def test_encode_result_is_byte_for_byte_encode_frame(rid: int, result: Any, more: bool) -> None:
    flags = FLAG_MORE if more else 0
    assert encode_result(rid, result, flags) == encode_frame({"id": rid, "ok": True, "result": result}, flags=flags)[0]


@FUZZ
@given(
    rid=st.integers(0, 2**64 - 1) | st.sampled_from(EDGE_IDS),
    name=st.text(max_size=30) | st.sampled_from(["x" * 23, "x" * 24, "y" * 255, "z" * 256, "é" * 40]),
    args=st.dictionaries(st.text(max_size=5), values, max_size=3),
)
def test_encode_call_is_byte_for_byte_encode_frame(rid: int, name: str, args: dict[str, Any]) -> None:
    assert encode_call(rid, name, args) == encode_frame({"id": rid, "call": name, "args": args})[0]


def test_the_kept_prefixes_end_where_packing_takes_over() -> None:
    """Short headers take their prefix from a table (codec._PLAIN_PREFIXES), longer ones pack it: the same bytes."""
    for size in range(codec._PLAIN_PREFIXES_MAX - 40, codec._PLAIN_PREFIXES_MAX + 10):
        for flags in (0, FLAG_MORE):
            result = "x" * size
            assert encode_result(9, result, flags) == encode_frame({"id": 9, "ok": True, "result": result}, flags=flags)[0]
        args = {"a": "y" * size}
        assert encode_call(300, "nop", args) == encode_frame({"id": 300, "call": "nop", "args": args})[0]


def test_encode_call_and_result_limits_and_errors() -> None:
    with pytest.raises(E2BIG, match="4096-byte limit"):
        encode_result(1, "x" * 5000, limits=SMALL)
    with pytest.raises(E2BIG, match="4096-byte limit"):
        encode_call(1, "x", {"a": "y" * 5000}, limits=SMALL)
    with pytest.raises(EINVAL, match="CBOR"):
        encode_result(1, object())
    with pytest.raises(EINVAL, match="CBOR"):
        encode_call(1, "bad\ud800name", {})
    [frame] = decode_all(encode_call(2**64 - 1, "nop", {}) + encode_result(7, {}, FLAG_MORE))[:1]
    assert frame.header == {"id": 2**64 - 1, "call": "nop", "args": {}}


@pytest.mark.parametrize("staging", STAGINGS)
def test_header_map_running_past_its_length_is_refused_wherever_it_lies(staging: int) -> None:
    """A staged header is decoded where it lies: a map longer than its declared length must
    not borrow the bytes after it, whether those are the next frame's or stale ones."""
    encoded = cbor2.dumps(REQ)
    short = raw_frame(encoded[:-1])
    for stream in (short + encoded[-1:] + frame_bytes(REQ), short + bytes(64), short):
        dec = Decoder(staging_nbytes=staging)
        with pytest.raises(ProtocolError, match="CBOR"):
            dec.feed(stream)
            dec.feed_eof()


@st.composite
def _entries(draw: Any) -> list[tuple[str, str, list[int], bytes]]:
    out = []
    for i in range(draw(st.integers(0, 6))):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        n = DTYPES[dtype]
        for d in shape:
            n *= d
        out.append((f"t{i}", dtype, shape, draw(st.binary(min_size=n, max_size=n))))
    return out


@given(_entries(), st.sampled_from([0, FLAG_MORE]), st.booleans())
def test_encode_laid_out_makes_encode_frames_bytes(entries, flags, reply):

    rows, views = tensor_table(entries)
    header: dict[str, Any] = {"id": 3, "ok": True, "result": {"x": 1}} if reply else {"id": 3, "call": "c", "args": {}}
    header["tensors"] = rows
    if not reply and flags:
        with pytest.raises(EINVAL):
            encode_laid_out(header, views, flags)
        return
    want = b"".join(bytes(p) for p in encode_frame(header, views, flags))
    assert b"".join(bytes(p) for p in encode_laid_out(header, views, flags)) == want


def test_encode_laid_out_checks_the_limits_like_encode_frame():

    rows, views = tensor_table([(f"t{i}", "uint8", [8], bytes(8)) for i in range(4)])
    header = {"id": 1, "ok": True, "result": None, "tensors": rows}
    for limits in (abi.Limits(max_tensors=3), abi.Limits(max_payload_nbytes=199)):
        with pytest.raises(E2BIG) as a:
            encode_frame(header, views, limits=limits)
        with pytest.raises(E2BIG) as b:
            encode_laid_out(header, views, limits=limits)
        assert a.value.message == b.value.message
    with pytest.raises(EINVAL):
        encode_laid_out({"id": 1, "tensors": rows}, views)  # neither a request nor a reply


# -- the same envelopes read back by hand (Decoder._read_envelope) ---------------------


def _general(header_bytes: bytes, flags: int, limits: abi.Limits = abi.DEFAULT_LIMITS) -> Any:
    """What the general path makes of a payload-free frame's header: the header, or the ProtocolError."""
    dec = Decoder(limits)
    dec.get_buffer()[: len(header_bytes)] = header_bytes  # staged, not yet parsed
    try:
        header = dec._decode_staged(0, len(header_bytes))
        check_header(header, flags, 0, limits)
    except ProtocolError as exc:
        return exc
    return header


def _by_hand(header_bytes: bytes, flags: int, limits: abi.Limits = abi.DEFAULT_LIMITS) -> Any:
    dec = Decoder(limits)
    dec.get_buffer()[: len(header_bytes)] = header_bytes
    envelope = dec._read_envelope(0, len(header_bytes), flags)
    return None if envelope is None else envelope_frame(envelope).header


@FUZZ
@given(
    rid=st.integers(0, 2**64 - 1) | st.sampled_from(EDGE_IDS),
    name=st.text(max_size=30) | st.sampled_from(["x" * 23, "x" * 24, "y" * 255, "z" * 256, "é" * 40]),
    value=values,
    reply=st.booleans(),
    more=st.booleans(),
    bare=st.booleans(),
)
def test_usual_envelopes_are_read_by_hand_as_the_general_path_reads_them(
    rid: int, name: str, value: Any, reply: bool, more: bool, bare: bool
) -> None:
    """`bare`: no arguments, or a result of {} (read in one look-up of what follows the id)."""
    if reply:
        value = {} if bare else value
        encoded, flags = encode_result(rid, value, FLAG_MORE if more else 0), FLAG_MORE if more else 0
    else:
        args = {} if bare else {"v": value, "n": name}
        encoded, flags = encode_call(rid, name, args), 0
    header_bytes = encoded[PREFIX_NBYTES:]
    by_hand = _by_hand(header_bytes, flags)
    expected = _general(header_bytes, flags)
    assert not isinstance(expected, ProtocolError)
    if len(name.encode()) < 256:  # longer names take the general path (their length head is 2 bytes)
        assert by_hand == expected
    [frame] = decode_all(encoded)
    assert frame.header == expected and frame.tensors == ()


@FUZZ
@given(
    rid=st.integers(0, 2**64 - 1) | st.sampled_from(EDGE_IDS),
    value=values,
    reply=st.booleans(),
    bare=st.booleans(),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3),
    cut=st.integers(0, 8),
    flags=st.sampled_from([0, FLAG_MORE]),
)
def test_a_header_read_by_hand_is_one_the_general_path_accepts_as_is(
    rid: int, value: Any, reply: bool, bare: bool, edits: list[tuple[int, int]], cut: int, flags: int
) -> None:
    """Corrupt a usual envelope (change bytes, drop the end): whatever the hand reader accepts, the
    general path accepts too and reads the same; what it declines is left to the general path."""
    if bare:
        encoded = encode_result(rid, {}) if reply else encode_call(rid, "nop", {})
    else:
        encoded = encode_result(rid, value) if reply else encode_call(rid, "forward", {"session": "s", "v": value})
    header_bytes = bytearray(encoded[PREFIX_NBYTES:])
    for at, byte in edits:
        header_bytes[at % len(header_bytes)] = byte
    header_bytes = bytes(header_bytes[: max(1, len(header_bytes) - cut)])
    by_hand = _by_hand(header_bytes, flags)
    if by_hand is not None:
        assert _general(header_bytes, flags) == by_hand


@pytest.mark.parametrize("limit", [2, 3, 8, abi.DEFAULT_LIMITS.max_cbor_depth])
@pytest.mark.parametrize("leaf", [1, {}, []])
def test_depth_limit_is_the_same_by_hand(limit: int, leaf: Any) -> None:
    limits = abi.Limits(max_cbor_depth=limit)
    for depth in range(limit + 2):
        inner: Any = leaf
        for _ in range(depth):
            inner = [inner]
        for encoded in (encode_call(1, "x", {"a": inner}), encode_result(1, inner)):
            general, by_hand = _general(encoded[PREFIX_NBYTES:], 0, limits), _by_hand(encoded[PREFIX_NBYTES:], 0, limits)
            if isinstance(general, ProtocolError):
                assert by_hand is None
            else:
                assert by_hand == general


@pytest.mark.parametrize("reply", [False, True])
def test_the_depth_rule_is_the_one_protocol_md_states(reply: bool) -> None:
    """No item inside more than max_cbor_depth containers, the header map included; an empty container
    holds no item, so it may be the item at the deepest level. Both readers (by hand and general)."""
    limit = abi.DEFAULT_LIMITS.max_cbor_depth

    def frame(value: Any) -> bytes:  # the value sits inside 2 containers: the header map and args
        if reply:
            return encode_frame({"id": 1, "ok": True, "result": {"v": value}})[0]
        return encode_frame({"id": 1, "call": "echo", "args": {"v": value}})[0]

    def nested(levels: int, leaf: Any) -> Any:  # `leaf` inside `levels` lists
        for _ in range(levels):
            leaf = [leaf]
        return leaf

    decode_all(frame(nested(limit - 2, 1)))  # the 1 sits inside `limit` containers
    rejects(frame(nested(limit - 1, 1)))  # inside limit + 1
    decode_all(frame(nested(limit - 2, [])))  # the empty list sits inside `limit`: it holds nothing deeper
    rejects(frame(nested(limit - 1, [])))


def test_a_bare_request_with_more_is_left_to_the_general_path() -> None:
    """A request may not carry MORE: the look-up of a bare request's tail is for frames without it."""
    header_bytes = encode_call(5, "nop", {})[PREFIX_NBYTES:]
    assert _by_hand(header_bytes, 0) == {"id": 5, "call": "nop", "args": {}}
    assert _by_hand(header_bytes, FLAG_MORE) is None
    assert isinstance(_general(header_bytes, FLAG_MORE), ProtocolError)
    assert _by_hand(encode_result(5, {}, FLAG_MORE)[PREFIX_NBYTES:], FLAG_MORE) == {"id": 5, "ok": True, "result": {}}


@pytest.mark.parametrize(
    "header_bytes, match",
    [
        (b"\xa3\x62id\x01\x64call\x62\xff\xfe\x64args\xa0", "CBOR"),  # the name is not UTF-8
        (b"\xa3\x62id\x01\x64call\x61x\x64args\xa1\x01\x01", "text string"),  # a key in args
        (b"\xa3\x62id\x01\x64call\x61x\x64args\xa2\x61k\x01\x61k\x02", "CBOR"),  # a duplicate key in args
        (b"\xa3\x62id\x01\x64call\x61x\x64args\xc1\x01", "CBOR"),  # a tag as args
        (b"\xa3\x62id\x01\x64call\x61x\x64args\x80", "'args' must be a map"),  # args is not a map
        (b"\xa3\x62id\x01\x62ok\xf5\x66result\xd9\xd9\xf7\x01", "CBOR"),  # a tag in a result
    ],
)
def test_malformed_usual_envelopes_are_still_refused(header_bytes: bytes, match: str) -> None:
    assert _by_hand(header_bytes, 0) is None
    rejects(raw_frame(header_bytes), match)


def test_more_on_a_request_is_refused_by_hand_as_well() -> None:
    encoded = encode_call(3, "nop", {})
    assert _by_hand(encoded[PREFIX_NBYTES:], FLAG_MORE) is None
    rejects(raw_frame(encoded[PREFIX_NBYTES:], flags=FLAG_MORE), "MORE")


# -- Decoder.take_lone: the usual read in fewer steps -----------------------------------


def _chunks_twice(chunks: list[bytes], staging: int, limits: abi.Limits = abi.DEFAULT_LIMITS) -> tuple[Any, Any]:
    """Feed `chunks` to a decoder through buffer_updated and to another through take_lone, read by read (as a
    socket would write them into get_buffer); returns each one's (frames in order, error message or None)."""
    outcomes = []
    for lone in (False, True):
        dec = Decoder(limits, staging_nbytes=staging)
        got: list[Frame] = []
        error = None
        try:
            for chunk in chunks:
                pos = 0
                while pos < len(chunk):
                    buf = dec.get_buffer()
                    n = min(len(buf), len(chunk) - pos)
                    buf[:n] = chunk[pos : pos + n]
                    pos += n
                    if lone and (envelope := dec.take_lone(n)) is not None:
                        got.append(envelope_frame(envelope))
                    elif not lone:
                        dec.buffer_updated(n)
                    while (f := dec.next_frame()) is not None:
                        got.append(f)
            dec.feed_eof()
        except ProtocolError as exc:
            error = exc.message
            assert dec.dead
        outcomes.append(([(f.flags, f.header, bytes(f.payload), f.tensors) for f in got], error))
    return outcomes[0], outcomes[1]


@FUZZ
@given(st.lists(frames(), min_size=1, max_size=4), st.data(), st.sampled_from(STAGINGS))
def test_take_lone_reads_any_stream_as_buffer_updated_does(msgs: list[Any], data: st.DataObject, staging: int) -> None:
    stream = b"".join(frame_bytes(*m) for m in msgs)
    # Reads that end on frame boundaries (where take_lone may take a frame) and reads that do not.
    bounds = list(itertools.accumulate(len(frame_bytes(*m)) for m in msgs))
    cuts = sorted(set(data.draw(st.lists(st.sampled_from(bounds) | st.integers(0, len(stream)), max_size=8))))
    chunks = [stream[lo:hi] for lo, hi in zip([0, *cuts], [*cuts, len(stream)]) if hi > lo]
    plain, lone = _chunks_twice(chunks, staging)
    assert lone == plain
    assert len(lone[0]) == len(msgs) and lone[1] is None


@FUZZ
@given(frames(), st.data())
def test_take_lone_fails_as_buffer_updated_does(msg: Any, data: st.DataObject) -> None:
    stream = bytearray(frame_bytes(*msg))
    for _ in range(data.draw(st.integers(1, 4))):
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    plain, lone = _chunks_twice([bytes(stream)], 64 << 10, SMALL)
    assert lone == plain


def test_take_lone_takes_one_whole_usual_frame_and_nothing_else() -> None:
    dec = Decoder()
    request = encode_call(300, "stat", {"x": [1, 2]})
    dec.get_buffer()[: len(request)] = request
    assert dec.take_lone(len(request)) == (300, "stat", {"x": [1, 2]})
    assert dec.next_frame() is None
    reply = encode_result(2**40, {"ok": 1})
    dec.get_buffer()[: len(reply)] = reply
    assert dec.take_lone(len(reply)) == (2**40, None, {"ok": 1})
    # Two frames in one read, a frame with a payload, a streamed reply, an error reply and a frame cut short
    # go through buffer_updated: take_lone returns None and next_frame hands them out as usual.
    for data, n in ((request + reply, 2), (frame_bytes(REQ, [("t", "int8", [3], b"abc")]), 1),
                    (encode_result(5, 1, FLAG_MORE), 1), (frame_bytes({"id": 1, "ok": False, "error": {
                        "errno": "EIO", "code": 5, "message": "m"}}), 1), (request[:-1], 0)):
        dec = Decoder()
        dec.get_buffer()[: len(data)] = data
        assert dec.take_lone(len(data)) is None
        assert len([f for f in iter(dec.next_frame, None)]) == n
    # What the staging buffer already held comes first: the frame that completes it is not taken alone.
    dec = Decoder()
    for piece in (request[:5], request[5:]):
        dec.get_buffer()[: len(piece)] = piece
        assert dec.take_lone(len(piece)) is None
    assert dec.next_frame().header == {"id": 300, "call": "stat", "args": {"x": [1, 2]}}


def test_request_names_past_the_kept_ones_are_still_read_and_written() -> None:
    """encode_call and the Decoder keep the first names they see; any later one goes the long way, the same."""
    for i in range(codec._CALL_MIDDLES_MAX + 50):
        name = f"call-{i}-é"
        encoded = encode_call(i, name, {"i": i})
        assert encoded == b"".join(encode_frame({"id": i, "call": name, "args": {"i": i}}))
        [frame] = decode_all(encoded)
        assert frame.header == {"id": i, "call": name, "args": {"i": i}}
    assert len(codec._CALL_NAMES) <= codec._CALL_MIDDLES_MAX and len(codec._CALL_MIDDLES) <= codec._CALL_MIDDLES_MAX
