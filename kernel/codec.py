"""The wire codec: frames to bytes and bytes to frames, with no I/O and no torch.

Rules: a frame is a 20-byte prefix, one CBOR map (the header), then the raw
payload, which holds the tensors' bytes at 64-byte-aligned offsets
(docs/PROTOCOL.md). The encoder never copies tensor bytes. The Decoder is fed
bytes and hands out whole frames; every limit is checked before the buffer it
bounds is allocated, and a payload is received straight into its own buffer.
A read that is exactly one usual frame (no tensors) may be taken as its envelope
alone (`take_lone`), with no Frame made. Malformed input raises ProtocolError
and leaves the decoder dead. The two
blocking socket helpers at the end are for clients; the Decoder is the only parser.
"""

from __future__ import annotations

import io
import math
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, NamedTuple, TypeAlias

import cbor2

from .abi import DEFAULT_LIMITS, MAGIC, PROTOCOL_VERSION, Limits
from .errors import E2BIG, EINVAL, EPROTO, KernelError

__all__ = [
    "ALIGN", "DTYPES", "FLAG_MORE", "LONE_FRAME", "MAX_NDIM", "PREFIX", "PREFIX_NBYTES", "SEND_BUFFER_NBYTES",
    "Decoder", "Frame", "FrameTooLarge", "ProtocolError", "TensorEntry", "TensorSpec",
    "check_header", "encode_call", "encode_frame", "encode_laid_out", "encode_result", "envelope_frame", "recv_frame",
    "send_frame", "tensor_table",
]

Buffer: TypeAlias = Any  # any object with the buffer protocol (collections.abc.Buffer needs 3.12)
Part: TypeAlias = bytes | memoryview
TensorEntry: TypeAlias = tuple[str, str, Sequence[int], Buffer]  # (name, dtype, shape, bytes)

PREFIX: Final = struct.Struct("<4sBBHIQ")  # magic, version, flags, reserved, header nbytes, payload nbytes
PREFIX_NBYTES: Final = PREFIX.size
_pack_prefix: Final = PREFIX.pack
_unpack_prefix_from: Final = PREFIX.unpack_from
# The prefix as (magic+version+flags+reserved, header nbytes, payload nbytes): the first
# word of a valid prefix is one of two values, so it is checked in two comparisons.
_unpack_words_from: Final = struct.Struct("<QIQ").unpack_from
ALIGN: Final = 64  # every tensor segment starts at a multiple of this, counted from the payload start
FLAG_MORE: Final = 0x01  # a streamed reply continues after this frame
MAX_NDIM: Final = 64  # dimensions of one tensor; no model needs more
STAGING_NBYTES: Final = 64 << 10  # what one read may take in before the frame's size is known
# SO_SNDBUF that both ends ask for on a Unix socket: a 16 MiB tensor then crosses in a few
# large steps instead of ~80 of the default 208 KiB, each a sleep and a wake-up of the reader.
# The kernel caps it at net.core.wmem_max; it bounds memory in flight, it allocates nothing.
SEND_BUFFER_NBYTES: Final = 4 << 20

# dtype name -> item size in bytes. The names are torch's; the list is part of the wire.
DTYPES: Final[Mapping[str, int]] = MappingProxyType({
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
    "uint16": 2, "uint32": 4, "uint64": 8, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
})  # fmt: skip

_MAX_UINT64: Final = (1 << 64) - 1
_MAX_INT64: Final = (1 << 63) - 1
_ROW_KEYS: Final = frozenset(("name", "dtype", "shape", "offset", "nbytes"))
_PADS: Final = tuple(bytes(n) for n in range(ALIGN))
_IOV_MAX: Final = 512  # parts per sendmsg call; POSIX guarantees at least 16, Linux allows 1024
_EMPTY: Final = memoryview(bytearray())


class ProtocolError(EPROTO):
    """The peer broke the wire protocol; nothing after this point of the stream can be trusted.

    Raised by Decoder on any malformed input. The decoder is dead afterwards: close
    the connection (a server may first send one error reply with id 0).
    """


class FrameTooLarge(ProtocolError, E2BIG):
    """A frame's prefix or tensor table exceeds a limit; nothing was allocated for it. errno E2BIG."""

    errno = "E2BIG"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One validated row of a frame's tensor table: where one tensor's bytes lie in the payload."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset, "nbytes": self.nbytes
        }


class Frame(NamedTuple):
    """One decoded frame. `header` passed the envelope checks; `tensors` lie inside `payload`.

    `payload` is a writable view of the buffer the payload was received into (from
    the decoder's `alloc_payload`); it belongs to whoever took the frame. A frame
    is immutable like the frozen dataclasses elsewhere, but a NamedTuple: the decoder
    makes one per frame, and a frozen dataclass costs three times as much to build.
    """

    flags: int
    header: dict[str, Any]
    payload: memoryview
    tensors: tuple[TensorSpec, ...] = ()

    @property
    def more(self) -> bool:
        return bool(self.flags & FLAG_MORE)

    @property
    def id(self) -> int:
        return self.header["id"]

    def segment(self, spec: TensorSpec) -> memoryview:
        return self.payload[spec.offset : spec.offset + spec.nbytes]


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _byte_view(buf: Buffer) -> memoryview:
    """A flat unsigned-byte view of `buf` without copying. Raises EINVAL if that is impossible."""
    try:
        view = memoryview(buf)
    except TypeError:
        raise EINVAL(f"a tensor buffer must support the buffer protocol, got {type(buf).__name__}") from None
    if not view.c_contiguous:
        raise EINVAL("a tensor buffer must be C-contiguous; make it contiguous first")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def check_header(
    header: Any,
    flags: int,
    payload_nbytes: int,
    limits: Limits = DEFAULT_LIMITS,
    error: type[KernelError] = ProtocolError,
    too_big: type[KernelError] = FrameTooLarge,
) -> tuple[TensorSpec, ...]:
    """Check a header's envelope and tensor table against its payload; return the table's rows.

    Raises `error` for anything malformed and `too_big` when the table exceeds
    `limits.max_tensors`. The decoder passes ProtocolError; the encoder EINVAL / E2BIG.
    """
    # Fast path for the usual frame, a well-formed request or successful reply
    # without tensors: the same checks as below, in fewer steps. Anything else
    # takes the full path, which finds the rule that was broken.
    if type(header) is dict and "tensors" not in header:
        rid = header.get("id")
        if type(rid) is int and 0 <= rid <= _MAX_UINT64:
            if "call" in header:
                if (
                    type(header["call"]) is str and type(header.get("args")) is dict
                    and "ok" not in header and not flags & FLAG_MORE
                ):
                    return ()
            elif header.get("ok") is True and "result" in header:
                return ()
    return _check_envelope(header, flags, payload_nbytes, limits, error, too_big)


def _check_envelope(
    header: Any, flags: int, payload_nbytes: int, limits: Limits, error: type[KernelError], too_big: type[KernelError],
    table: bool = True,
) -> tuple[TensorSpec, ...]:
    if type(header) is not dict:
        raise error(f"a header must be a CBOR map, got {type(header).__name__}")
    rid = header.get("id")
    if type(rid) is not int or not 0 <= rid <= _MAX_UINT64:
        raise error(f"header 'id' must be an unsigned integer below 2**64, got {rid!r}")
    if "call" in header:
        if "ok" in header:
            raise error("a header carries 'call' (a request) or 'ok' (a reply), not both")
        if type(header["call"]) is not str:
            raise error("request 'call' must be a text string")
        if type(header.get("args")) is not dict:
            raise error("request 'args' must be a map (an empty map when there are none)")
        if flags & FLAG_MORE:
            raise error("MORE is set on a request; only replies stream")
    elif "ok" in header:
        ok = header["ok"]
        if type(ok) is not bool:
            raise error("reply 'ok' must be true or false")
        if ok and "result" not in header:
            raise error("a reply with ok=true must carry 'result'")
        if not ok:
            err = header.get("error")
            if (
                type(err) is not dict
                or type(err.get("errno")) is not str
                or type(err.get("code")) is not int
                or type(err.get("message")) is not str
            ):
                raise error("a reply with ok=false must carry 'error': {errno: str, code: int, message: str}")
            if flags & FLAG_MORE:
                raise error("MORE is set on an error reply; an error ends its stream")
    else:
        raise error("a header needs 'call' (a request) or 'ok' (a reply)")
    if "tensors" not in header or not table:
        return ()
    return _check_table(header["tensors"], payload_nbytes, limits, error, too_big)


def _check_table(
    rows: Any, payload_nbytes: int, limits: Limits, error: type[KernelError], too_big: type[KernelError]
) -> tuple[TensorSpec, ...]:
    if type(rows) is not list:
        raise error("header 'tensors' must be an array of rows")
    if len(rows) > limits.max_tensors:
        raise _too_many_tensors(len(rows), limits, too_big)
    specs: list[TensorSpec] = []
    names: set[str] = set()
    for i, row in enumerate(rows):
        if type(row) is not dict or row.keys() != _ROW_KEYS:
            raise error(f"tensor row {i} must be a map with exactly the keys name, dtype, shape, offset, nbytes")
        name, dtype, shape, offset, nbytes = row["name"], row["dtype"], row["shape"], row["offset"], row["nbytes"]
        if type(name) is not str or not name:
            raise error(f"tensor row {i}: 'name' must be a non-empty text string")
        if name in names:
            raise error(f"tensor name {name!r} appears twice in the table")
        names.add(name)
        itemsize = DTYPES.get(dtype) if type(dtype) is str else None
        if itemsize is None:
            raise error(f"tensor {name!r}: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        if type(shape) is not list or len(shape) > MAX_NDIM:
            raise error(f"tensor {name!r}: shape must be an array of at most {MAX_NDIM} unsigned integers, got {shape!r}")
        numel = span = 1  # span: the product with zero dimensions counted as 1, which must be addressable too
        for d in shape:  # a loop, not math.prod over generators: this runs for every tensor of every frame
            if type(d) is not int or d < 0:
                raise error(f"tensor {name!r}: shape must be an array of at most {MAX_NDIM} unsigned integers, "
                            f"got {shape!r}")
            numel *= d
            span *= d or 1
        if span * itemsize > _MAX_INT64:
            raise error(f"tensor {name!r}: shape {shape} is too large to address")
        if type(offset) is not int or offset < 0 or offset % ALIGN:
            raise error(f"tensor {name!r}: offset {offset!r} is not a multiple of {ALIGN}")
        expected = numel * itemsize
        if type(nbytes) is not int or nbytes != expected:
            raise error(f"tensor {name!r}: nbytes {nbytes!r} != prod(shape) * itemsize = {expected}")
        if offset + nbytes > payload_nbytes:
            raise error(
                f"tensor {name!r}: bytes [{offset}, {offset + nbytes}) lie outside the {payload_nbytes}-byte payload"
            )
        specs.append(TensorSpec(name, dtype, tuple(shape), offset, nbytes))
    if len(specs) < 2:
        return tuple(specs)
    end = 0
    for spec in sorted((s for s in specs if s.nbytes), key=lambda s: s.offset):
        if spec.offset < end:
            raise error(f"tensor {spec.name!r} overlaps another segment: it starts at {spec.offset}, before {end}")
        end = spec.offset + spec.nbytes
    return tuple(specs)


def tensor_table(entries: Iterable[TensorEntry]) -> tuple[list[dict[str, Any]], list[memoryview]]:
    """Lay tensors out back to back at 64-byte boundaries, in the given order.

    Returns the rows for `header["tensors"]` and the byte views to pass to
    `encode_frame` (no copies). An empty tensor takes no bytes but still gets an
    aligned offset. Rows are checked by `encode_frame`, not here.
    """
    rows: list[dict[str, Any]] = []
    views: list[memoryview] = []
    cursor = 0
    for name, dtype, shape, buf in entries:
        view = _byte_view(buf)
        offset = _align(cursor)
        rows.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": view.nbytes})
        views.append(view)
        cursor = offset + view.nbytes
    return rows, views


def encode_frame(
    header: Mapping[str, Any], buffers: Sequence[Buffer] = (), flags: int = 0, *, limits: Limits = DEFAULT_LIMITS
) -> list[Part]:
    """Encode one frame as parts for `transport.writelines` or `send_frame`.

    `header["tensors"]`, if present, describes `buffers` row for row (see
    `tensor_table`). The parts alias the buffers: they must not change until sent.
    Raises EINVAL for a header or table the peer would reject, E2BIG over `limits`.
    """
    if flags & ~FLAG_MORE or flags < 0:
        raise EINVAL(f"unknown frame flags {flags:#x}; only FLAG_MORE ({FLAG_MORE:#x}) exists")
    if "tensors" not in header and not buffers:  # the usual frame: a header and no payload
        check_header(header if type(header) is dict else dict(header), flags, 0, limits, EINVAL, E2BIG)
        return [_head(header, flags, 0, limits)]
    rows = header.get("tensors", ())
    try:
        payload_nbytes = max((row["offset"] + row["nbytes"] for row in rows), default=0)
    except (TypeError, KeyError):
        raise EINVAL("header 'tensors' must be rows from tensor_table()") from None
    specs = check_header(dict(header), flags, payload_nbytes, limits, EINVAL, E2BIG)
    if payload_nbytes > limits.max_payload_nbytes:
        raise _payload_too_big(payload_nbytes, limits)
    if len(buffers) != len(specs):
        raise EINVAL(f"{len(buffers)} buffers for {len(specs)} tensor rows")

    def segments() -> Iterable[tuple[int, int, memoryview]]:
        for spec, buf in sorted(zip(specs, buffers), key=lambda pair: pair[0].offset):
            view = _byte_view(buf)
            if view.nbytes != spec.nbytes:
                raise EINVAL(f"tensor {spec.name!r}: buffer holds {view.nbytes} bytes, the table says {spec.nbytes}")
            yield spec.offset, spec.nbytes, view

    return _lay_out(_head(header, flags, payload_nbytes, limits), segments(), payload_nbytes)


def encode_laid_out(
    header: dict[str, Any], views: Sequence[memoryview], flags: int = 0, *, limits: Limits = DEFAULT_LIMITS
) -> list[Part]:
    """`encode_frame(header, views, flags)` for a `header["tensors"]` that `tensor_table` made from
    `views`, unchanged since: the same parts, without checking that table row by row, since it
    holds by construction (its rows in offset order, each as long as its view). The envelope and
    every limit are checked as `encode_frame` checks them. Raises EINVAL or E2BIG.
    """
    if flags & ~FLAG_MORE or flags < 0:
        raise EINVAL(f"unknown frame flags {flags:#x}; only FLAG_MORE ({FLAG_MORE:#x}) exists")
    rows = header["tensors"]
    if len(rows) > limits.max_tensors:
        raise _too_many_tensors(len(rows), limits, E2BIG)
    payload_nbytes = max((row["offset"] + row["nbytes"] for row in rows), default=0)
    _check_envelope(header, flags, payload_nbytes, limits, EINVAL, E2BIG, table=False)
    if payload_nbytes > limits.max_payload_nbytes:
        raise _payload_too_big(payload_nbytes, limits)
    segments = ((row["offset"], row["nbytes"], view) for row, view in zip(rows, views))
    return _lay_out(_head(header, flags, payload_nbytes, limits), segments, payload_nbytes)


def _lay_out(head: bytes, segments: Iterable[tuple[int, int, Part]], payload_nbytes: int) -> list[Part]:
    """`head`, then each (offset, nbytes, bytes) segment, in offset order, with zero bytes in the gaps
    and after the last segment up to `payload_nbytes`."""
    parts: list[Part] = [head]
    cursor = 0
    for offset, nbytes, view in segments:
        if not nbytes:
            continue
        if offset > cursor:
            gap = offset - cursor
            parts.append(_PADS[gap] if gap < ALIGN else bytes(gap))
        parts.append(view)
        cursor = offset + nbytes
    if payload_nbytes > cursor:
        gap = payload_nbytes - cursor
        parts.append(_PADS[gap] if gap < ALIGN else bytes(gap))
    return parts


def _payload_too_big(nbytes: int, limits: Limits) -> E2BIG:
    return E2BIG(
        f"payload of {nbytes} bytes exceeds the {limits.max_payload_nbytes}-byte limit; split the request",
        details={"limit": "max_payload_nbytes", "value": nbytes, "max": limits.max_payload_nbytes},
    )


def _too_many_tensors(n: int, limits: Limits, too_big: type[KernelError]) -> KernelError:
    return too_big(
        f"{n} tensors in one frame, the limit is {limits.max_tensors}; split the request",
        details={"limit": "max_tensors", "value": n, "max": limits.max_tensors},
    )


def _head(header: Mapping[str, Any], flags: int, payload_nbytes: int, limits: Limits) -> bytes:
    """The prefix and the CBOR header as one bytes object. Raises EINVAL or E2BIG."""
    try:
        encoded = cbor2.dumps(header)
    except (cbor2.CBORError, TypeError, ValueError) as exc:
        raise EINVAL(f"header cannot be encoded as CBOR: {exc}") from None
    if len(encoded) > limits.max_header_nbytes:
        raise _header_too_big(len(encoded), limits)
    return _pack_prefix(MAGIC, PROTOCOL_VERSION, flags, 0, len(encoded), payload_nbytes) + encoded


def _header_too_big(nbytes: int, limits: Limits) -> E2BIG:
    return E2BIG(
        f"CBOR header of {nbytes} bytes exceeds the {limits.max_header_nbytes}-byte limit; send bulk data as tensors",
        details={"limit": "max_header_nbytes", "value": nbytes, "max": limits.max_header_nbytes},
    )


# The envelopes of the two usual frames, written by hand around the one value cbor2 encodes:
# a cbor2.dumps call costs several hundred nanoseconds even for a small map. The bytes are
# exactly cbor2's (shortest heads, keys in insertion order); a test compares them. The
# Decoder reads them back by hand the same way (Decoder._read_envelope).
_UINT_HEADS: Final = tuple(bytes((n,)) if n < 24 else bytes((0x18, n)) for n in range(256))
_TEXT_HEADS: Final = tuple(bytes((0x60 | n,)) if n < 24 else bytes((0x78, n)) for n in range(256))
# The argument after an unsigned-integer head 0x18..0x1B: (its size in bytes, how to read it), by head.
_UINT_ARGS: Final = {0x18 + i: (size, struct.Struct(f">{code}").unpack_from)
                     for i, (size, code) in enumerate(((1, "B"), (2, "H"), (4, "I"), (8, "Q")))}
_pack_head16: Final = struct.Struct(">BH").pack
_pack_head32: Final = struct.Struct(">BI").pack
_pack_head64: Final = struct.Struct(">BQ").pack
_MAP3_ID: Final = b"\xa3\x62id"  # map(3), "id": how a request and a successful reply begin
_RESULT_MIDDLE: Final = b"\x62ok\xf5\x66result"  # "ok": true, "result"
_CALL_MIDDLE: Final = b"\x64call"
_ARGS_KEY: Final = b"\x64args"
_EMPTY_MAP: Final = b"\xa0"
# A request's middle (see _call_middle) ends this many bytes past its start, plus the name's text head
# (0x60 + length, below 24) or plus the length (after the head 0x78).
_CALL_SPAN_SHORT: Final = len(_CALL_MIDDLE) + 1 - 0x60 + len(_ARGS_KEY)
_CALL_SPAN_LONG: Final = len(_CALL_MIDDLE) + 2 + len(_ARGS_KEY)
# The shortest usual envelope (id 0, a value of one byte; a request's name empty): anything shorter is not one.
_ENVELOPE_MIN_NBYTES: Final = len(_MAP3_ID) + 2 + min(len(_RESULT_MIDDLE), len(_CALL_MIDDLE) + 1 + len(_ARGS_KEY))


def _cbor_head(major: int, n: int, small: tuple[bytes, ...]) -> bytes:
    """The shortest head of CBOR major type `major` (already shifted: 0x00 uint, 0x60 text) with argument 0 <= n < 2**64."""
    if n < 256:
        return small[n]
    if n < 0x10000:
        return _pack_head16(major | 25, n)
    if n < 0x100000000:
        return _pack_head32(major | 26, n)
    return _pack_head64(major | 27, n)


def _value_cbor(value: Any) -> bytes:
    try:
        return cbor2.dumps(value)
    except (cbor2.CBORError, TypeError, ValueError) as exc:
        raise EINVAL(f"header cannot be encoded as CBOR: {exc}") from None


def encode_result(rid: int, result: Any, flags: int = 0, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The frame {"id": rid, "ok": true, "result": result} without payload: the bytes `encode_frame` makes of it.

    The hot path of replies. The caller guarantees what `check_header` would check:
    0 <= rid < 2**64, flags 0 or FLAG_MORE, and no tensors in `result` (see
    `tensors.encode_reply`). Raises EINVAL if `result` is not CBOR, E2BIG over the header limit.
    """
    head = (_RESULT_HEADS[rid] if rid < 256
            else b"".join((_MAP3_ID, _cbor_head(0x00, rid, _UINT_HEADS), _RESULT_MIDDLE)))
    value = _EMPTY_MAP if not result and type(result) is dict else _value_cbor(result)
    nbytes = len(head) + len(value)
    if nbytes > limits.max_header_nbytes:
        raise _header_too_big(nbytes, limits)
    prefix = (_PLAIN_PREFIXES[nbytes] if nbytes < _PLAIN_PREFIXES_MAX and not flags
              else _pack_prefix(MAGIC, PROTOCOL_VERSION, flags, 0, nbytes, 0))
    return b"".join((prefix, head, value))


def encode_call(rid: int, name: str, args: dict[str, Any], *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The frame {"id": rid, "call": name, "args": args} without payload: the bytes `encode_frame` makes of it.

    The hot path of requests. The caller guarantees 0 <= rid < 2**64, a str `name`
    and a map of plain values (no tensors; see `tensors.encode_request`). Raises
    EINVAL if a value is not CBOR, E2BIG over the header limit.
    """
    middle = _CALL_MIDDLES.get(name)
    if middle is None:
        middle = _call_middle(name)
    head = _ID_HEADS[rid] if rid < 256 else _MAP3_ID + _cbor_head(0x00, rid, _UINT_HEADS)
    value = _EMPTY_MAP if not args else _value_cbor(args)
    nbytes = len(head) + len(middle) + len(value)
    if nbytes > limits.max_header_nbytes:
        raise _header_too_big(nbytes, limits)
    prefix = (_PLAIN_PREFIXES[nbytes] if nbytes < _PLAIN_PREFIXES_MAX
              else _pack_prefix(MAGIC, PROTOCOL_VERSION, 0, 0, nbytes, 0))
    return b"".join((prefix, head, middle, value))


def _call_middle(name: str) -> bytes:
    """What a request's header holds between its id and its args' value: "call", the name, "args".
    Kept for the first _CALL_MIDDLES_MAX names (the syscalls a client makes are few)."""
    try:
        name_utf8 = name.encode()
    except UnicodeEncodeError as exc:
        raise EINVAL(f"header cannot be encoded as CBOR: {exc}") from None
    size = len(name_utf8)
    middle = b"".join((_CALL_MIDDLE, _TEXT_HEADS[size] if size < 256 else _cbor_head(0x60, size, _TEXT_HEADS),
                       name_utf8, _ARGS_KEY))
    if len(_CALL_MIDDLES) < _CALL_MIDDLES_MAX:
        _CALL_MIDDLES[name] = middle
        _BARE_TAILS[middle + _EMPTY_MAP] = (name,)
    return middle


def _call_name(middle: bytes) -> str | None:
    """The name in a request header's `middle` (see _call_middle; its text head is there), or None if
    it is not one. The first _CALL_MIDDLES_MAX names are kept: the reader then looks a middle up whole."""
    start = len(_CALL_MIDDLE) + (2 if middle[len(_CALL_MIDDLE)] == 0x78 else 1)  # after the name's text head
    try:
        name = middle[start : len(middle) - len(_ARGS_KEY)].decode()
    except UnicodeDecodeError:
        return None
    if _call_middle(name) != middle:
        return None
    if len(_CALL_NAMES) < _CALL_MIDDLES_MAX:
        _CALL_NAMES[middle] = name
    return name


# The middles of the requests seen so far, both ways: name -> middle (encode_call), middle -> name (Decoder).
_CALL_MIDDLES: dict[str, bytes] = {}
_CALL_NAMES: dict[bytes, str] = {}
# What follows the id in a usual envelope whose value is the empty map, read in one look-up: a request
# without arguments (its middle and {}) -> (its name,), a successful reply whose result is {} -> (None,).
_BARE_TAILS: dict[bytes, tuple[str | None]] = {_RESULT_MIDDLE + _EMPTY_MAP: (None,)}
_CALL_MIDDLES_MAX: Final = 512
# The prefix of a frame without flags or payload, by header length, for the short headers of most
# requests and replies: an index costs a fraction of a struct pack.
_PLAIN_PREFIXES_MAX: Final = 1024
_PLAIN_PREFIXES: Final = tuple(_pack_prefix(MAGIC, PROTOCOL_VERSION, 0, 0, n, 0) for n in range(_PLAIN_PREFIXES_MAX))
# How a header with id 0..255 begins: a request's (up to its middle), a successful reply's (up to its result).
_ID_HEADS: Final = tuple(_MAP3_ID + head for head in _UINT_HEADS)
_RESULT_HEADS: Final = tuple(head + _RESULT_MIDDLE for head in _ID_HEADS)


class _Rejected(Exception):
    pass


def _reject_tag(*_: Any) -> Any:
    raise _Rejected("CBOR tags are not allowed in a header")


def _check_keys(obj: Mapping[Any, Any], _immutable: bool) -> Any:
    for key in obj:
        if type(key) is not str:
            raise _Rejected(f"map key {key!r} is not a text string")
    return obj


# Every tag cbor2 6.x decodes by itself; the tag hook catches the rest.
_BUILTIN_TAGS: Final = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000, 55799)
_REJECT_TAGS: Final = {tag: _reject_tag for tag in _BUILTIN_TAGS}

_PREFIX_PHASE, _HEADER_PHASE, _PAYLOAD_PHASE = 0, 1, 2
_WORD_PLAIN: Final = struct.unpack("<Q", struct.pack("<4sBBH", MAGIC, PROTOCOL_VERSION, 0, 0))[0]
_WORD_MORE: Final = struct.unpack("<Q", struct.pack("<4sBBH", MAGIC, PROTOCOL_VERSION, FLAG_MORE, 0))[0]
_new_frame: Final = tuple.__new__  # Frame(...) through its generated __new__ costs twice as much


def envelope_frame(envelope: tuple[int, str | None, Any]) -> Frame:
    """The Frame that `Decoder.take_lone`'s (id, call, value) came from."""
    return _new_frame(Frame, (0, _envelope_header(envelope), _EMPTY, ()))


# What a frame taken by `Decoder.take_lone` carries besides its envelope: no flags, no payload, no
# tensors. Its header is empty; it stands for such a frame where one is asked for (`tensors.unpack`).
LONE_FRAME: Final = Frame(0, {}, _EMPTY, ())


def _envelope_header(envelope: tuple[int, str | None, Any]) -> dict[str, Any]:
    rid, name, value = envelope
    if name is None:
        return {"id": rid, "ok": True, "result": value}
    return {"id": rid, "call": name, "args": value}


def _bad_magic(seen: bytes) -> ProtocolError:
    return ProtocolError(f"bad magic {seen!r}, expected {MAGIC!r}: the peer does not speak the Djinn protocol")


class Decoder:
    """Bytes in, whole frames out. Works as the core of an asyncio.BufferedProtocol.

    Reads go into a small staging buffer until a frame's prefix is known; then
    the rest of its header goes into a bytearray of exactly the header length
    and the rest of its payload into `alloc_payload(payload_nbytes)` (default
    `bytearray`), so a large payload is received in place. Staged bytes that
    belong to a payload are copied into it once. Owned by one thread.
    """

    __slots__ = (
        "_limits", "_alloc", "_staging", "_start", "_end", "_phase", "_flags", "_header_nbytes",
        "_payload_nbytes", "_header", "_specs", "_target", "_target_pos", "_frames", "_died", "_cbor", "_cbor_in",
        "_staged_in", "_staged_cbor", "_value_cbor",
    )

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        alloc_payload: Callable[[int], Buffer] | None = None,
        *,
        staging_nbytes: int = STAGING_NBYTES,
    ) -> None:
        if staging_nbytes < PREFIX_NBYTES:
            raise ValueError(f"staging_nbytes must be at least {PREFIX_NBYTES}")
        self._limits = limits
        self._alloc: Callable[[int], Buffer] = alloc_payload or bytearray
        # The staging buffer is the memory of a BytesIO that one CBOR decoder reads: a
        # header that arrived whole is decoded where it lies, with no copy. A header
        # received in place (longer than one read) is copied into a second stream.
        self._staged_in = io.BytesIO(bytes(staging_nbytes))
        self._staging = self._staged_in.getbuffer()
        self._start = 0  # staged bytes not yet parsed are _staging[_start:_end]
        self._end = 0
        self._phase = _PREFIX_PHASE
        self._flags = 0
        self._header_nbytes = 0
        self._payload_nbytes = 0
        self._header: dict[str, Any] | None = None
        self._specs: tuple[TensorSpec, ...] = ()
        self._target: memoryview | None = None  # header or payload buffer being received in place
        self._target_pos = 0
        self._frames: deque[Frame] = deque()
        # Why the decoder died, once it has: the message alone. Keeping the exception would keep its traceback,
        # whose frames hold this decoder, a reference cycle around the staging buffer (a BytesIO export), which
        # CPython 3.12.0 and 3.12.1 crash on when the cyclic collector clears it (CPython gh-111211).
        self._died: str | None = None
        # One CBOR decoder per stream for the life of the Decoder: cheaper than one per header.
        self._staged_cbor = _header_decoder(self._staged_in, limits)
        # The value of a usual envelope (see _read_envelope), one container level below the header map.
        self._value_cbor = (_header_decoder(self._staged_in, limits, limits.max_cbor_depth - 1)
                            if limits.max_cbor_depth >= 2 else None)
        self._cbor_in = io.BytesIO()
        self._cbor = _header_decoder(self._cbor_in, limits)

    @property
    def dead(self) -> bool:
        return self._died is not None

    @property
    def in_place(self) -> bool:
        """True while `get_buffer` views the rest of one header or payload: a reader may wait
        until that whole view is filled (MSG_WAITALL) without reading past the frame."""
        return self._target is not None

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A non-empty writable view for the next bytes of the stream. Raises ProtocolError when dead."""
        if self._died is not None:
            self._check_alive()
        if self._target is not None:
            return self._target[self._target_pos :]
        end = self._end
        return self._staging[end:] if end else self._staging  # the usual read: the whole buffer, no new view

    def buffer_updated(self, nbytes: int) -> None:
        """Account for `nbytes` written at the start of the last `get_buffer` view; parse what is whole.

        Raises ProtocolError on malformed input. An exception from `alloc_payload`
        propagates unchanged; in every case the decoder is dead afterwards.
        """
        if self._died is not None:
            self._check_alive()
        target = self._target
        if target is None:
            end = self._end + nbytes
            if nbytes < 0 or end > len(self._staging):
                raise ValueError(f"buffer_updated({nbytes}) with {len(self._staging) - self._end} bytes of room")
            self._end = end
        else:
            pos = self._target_pos + nbytes
            if nbytes < 0 or pos > len(target):
                raise ValueError(f"buffer_updated({nbytes}) with {len(target) - self._target_pos} bytes of room")
            self._target_pos = pos
            if pos < len(target):
                return
        try:
            if target is None:
                self._parse_staged()
            else:
                self._target_done()
        except ProtocolError as exc:
            self._died = exc.message
            raise
        except BaseException as exc:
            self._died = f"decoder stopped by {type(exc).__name__}: {exc}"
            raise

    def feed(self, data: Buffer) -> None:
        """Take bytes (any split of the stream). Raises what `buffer_updated` raises."""
        view = _byte_view(data)
        pos, total = 0, len(view)
        while pos < total:
            buf = self.get_buffer(total - pos)
            n = min(len(buf), total - pos)
            buf[:n] = view[pos : pos + n]
            self.buffer_updated(n)
            pos += n

    def feed_eof(self) -> None:
        """The peer closed. Raises ProtocolError (and dies) if that cut a frame short."""
        self._check_alive()
        if self._target is not None or self._end > self._start or self._phase != _PREFIX_PHASE:
            self._died = "the connection closed in the middle of a frame"
            raise ProtocolError(self._died)

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive. Raises ProtocolError when dead."""
        if self._died is not None:
            self._check_alive()
        return self._frames.popleft() if self._frames else None

    def take_lone(self, nbytes: int) -> tuple[int, str | None, Any] | None:
        """`buffer_updated(nbytes)`, in fewer steps for the usual read. When the staging buffer held
        nothing and these bytes are exactly one whole frame without payload or MORE, in one of the two
        usual envelopes, the frame is taken and returned as (id, call, args) for a request or
        (id, None, result) for a successful reply; `next_frame` does not see it. Otherwise the bytes go
        through `buffer_updated` as usual and None is returned. Raises what `buffer_updated` raises."""
        staging = self._staging
        if (not (self._end or self._frames or self._died) and self._target is None
                and PREFIX_NBYTES < nbytes <= len(staging)):
            word, header_nbytes, payload_nbytes = _unpack_words_from(staging, 0)
            if (word == _WORD_PLAIN and header_nbytes == nbytes - PREFIX_NBYTES and not payload_nbytes
                    and header_nbytes <= self._limits.max_header_nbytes):
                envelope = self._read_envelope(PREFIX_NBYTES, header_nbytes, 0)
                if envelope is not None:
                    return envelope
        self.buffer_updated(nbytes)
        return None

    def _check_alive(self) -> None:
        if self._died is not None:
            raise ProtocolError(f"the decoder is dead after an earlier error: {self._died}")

    def _parse_staged(self) -> None:
        # The hot path: a small frame usually arrives whole in one read. Such a frame
        # (no payload, header all staged) is parsed in one turn of this loop, without
        # going through the phases; anything else walks them.
        buf = self._staging
        start, end = self._start, self._end
        limits = self._limits
        frames = self._frames
        while True:
            avail = end - start
            if self._phase == _PREFIX_PHASE:
                if avail < PREFIX_NBYTES:
                    if avail:
                        seen = bytes(buf[start : start + min(avail, len(MAGIC))])
                        if not MAGIC.startswith(seen):
                            raise _bad_magic(seen)
                    break
                word, header_nbytes, payload_nbytes = _unpack_words_from(buf, start)
                if (
                    (word != _WORD_PLAIN and word != _WORD_MORE)
                    or not 0 < header_nbytes <= limits.max_header_nbytes or payload_nbytes > limits.max_payload_nbytes
                ):
                    raise _bad_prefix(*_unpack_prefix_from(buf, start), limits)
                flags = 0 if word == _WORD_PLAIN else FLAG_MORE
                start += PREFIX_NBYTES
                avail -= PREFIX_NBYTES
                if not payload_nbytes and header_nbytes <= avail:
                    envelope = self._read_envelope(start, header_nbytes, flags)
                    if envelope is None:
                        header = self._decode_staged(start, header_nbytes)
                        specs = check_header(header, flags, 0, limits)
                    else:
                        header = _envelope_header(envelope)
                        specs = ()
                    frames.append(_new_frame(Frame, (flags, header, _EMPTY, specs)))
                    start += header_nbytes
                    continue
                self._flags = flags
                self._header_nbytes = header_nbytes
                self._payload_nbytes = payload_nbytes
                self._phase = _HEADER_PHASE
            if self._phase == _HEADER_PHASE:
                n = self._header_nbytes
                if avail < n:
                    self._target = memoryview(bytearray(n))
                    self._target[:avail] = buf[start:end]
                    self._target_pos = avail
                    self._start = self._end = 0
                    return
                header = self._decode_staged(start, n)
                start += n
                self._accept_header(header)
            else:
                payload = self._new_payload()
                take = min(avail, self._payload_nbytes)
                payload[:take] = buf[start : start + take]
                start += take
                if take < self._payload_nbytes:
                    self._target = payload
                    self._target_pos = take
                    self._start = self._end = 0
                    return
                self._finish(payload)
        left = end - start
        if left and start:
            buf[:left] = buf[start:end]
        self._start, self._end = 0, left

    def _read_envelope(self, start: int, nbytes: int, flags: int) -> tuple[int, str | None, Any] | None:
        """The header of `nbytes` at `start` of the staging buffer if it is one of the two usual
        envelopes, as encode_call and encode_result write them: {"id", "call", "args"} (no MORE) or
        {"id", "ok": true, "result"}, as (id, call, args) or (id, None, result) (`envelope_frame`
        makes the Frame of it). Only the value (args, result) goes through CBOR, with the
        header's rules one level down; what check_header checks holds by construction. None for
        anything else, which the general path decodes, checks and, if malformed, rejects."""
        value_cbor = self._value_cbor
        if value_cbor is None or nbytes < _ENVELOPE_MIN_NBYTES:
            return None
        stream = self._staged_in
        stream.seek(start)
        h = stream.read(nbytes)
        if not h.startswith(_MAP3_ID):
            return None
        head = h[4]
        if head < 24:
            rid, pos = head, 5
        elif head <= 27:  # 1, 2, 4 or 8 bytes follow; h holds them: nbytes >= _ENVELOPE_MIN_NBYTES > 5 + 8
            size, unpack_from = _UINT_ARGS[head]
            rid, pos = unpack_from(h, 5)[0], 5 + size
        else:
            return None
        bare = _BARE_TAILS.get(h[pos:]) if not flags else None
        if bare is not None:  # the commonest envelopes: a request without arguments, a reply of {}
            return rid, bare[0], {}
        if h[pos] == 0x64:  # a 4-byte text: a request's "call"
            head = h[pos + 5] if pos + 6 < nbytes and not flags else 0
            if 0x60 <= head < 0x78:  # the name's length; "args" follows it
                end = pos + _CALL_SPAN_SHORT + head
            elif head == 0x78:
                end = pos + _CALL_SPAN_LONG + h[pos + 6]
            else:
                return None
            middle = h[pos:end]
            name = _CALL_NAMES.get(middle)
            if name is None and (name := _call_name(middle)) is None:
                return None
            pos = end
        elif h.startswith(_RESULT_MIDDLE, pos):
            pos += len(_RESULT_MIDDLE)
            name = None
        else:
            return None
        if pos == nbytes - 1 and h[pos] == 0xA0:
            value: Any = {}
        else:
            stream.seek(start + pos)
            try:
                value = value_cbor.decode()
            except Exception:  # noqa: BLE001 - the general path finds and reports what is wrong
                return None
            if stream.tell() != start + nbytes:
                return None
        if name is not None and type(value) is not dict:
            return None
        return rid, name, value

    def _decode_staged(self, start: int, nbytes: int) -> Any:
        """The header of `nbytes` at `start` of the staging buffer, decoded where it lies. Raises ProtocolError."""
        stream = self._staged_in
        stream.seek(start)
        try:
            header = self._staged_cbor.decode()
        except Exception as exc:
            raise ProtocolError(f"the header is not acceptable CBOR: {exc.__cause__ or exc}") from None
        used = stream.tell() - start
        if used != nbytes:  # the map ends inside its declared length, or runs past it into the next bytes
            raise _header_length_error(used, nbytes)
        return header

    def _target_done(self) -> None:
        target, self._target = self._target, None
        assert target is not None
        if self._phase == _HEADER_PHASE:
            self._read_header(target)
            if self._phase == _PAYLOAD_PHASE:
                self._target = self._new_payload()
                self._target_pos = 0
        else:
            self._finish(target)

    def _read_header(self, view: memoryview) -> None:
        stream = self._cbor_in
        stream.seek(0)
        stream.write(view)
        stream.truncate()  # the CBOR decoder must hit the end here, not stale bytes of a longer header
        stream.seek(0)
        try:
            header = self._cbor.decode()
        except Exception as exc:
            raise ProtocolError(f"the header is not acceptable CBOR: {exc.__cause__ or exc}") from None
        if stream.tell() != len(view):
            raise _header_length_error(stream.tell(), len(view))
        self._accept_header(header)

    def _accept_header(self, header: Any) -> None:
        specs = check_header(header, self._flags, self._payload_nbytes, self._limits)
        if self._payload_nbytes:
            self._header = header
            self._specs = specs
            self._phase = _PAYLOAD_PHASE
        else:
            self._frames.append(Frame(self._flags, header, _EMPTY, specs))
            self._phase = _PREFIX_PHASE

    def _new_payload(self) -> memoryview:
        n = self._payload_nbytes
        view = memoryview(self._alloc(n))
        if view.readonly or not view.c_contiguous:
            raise ValueError("alloc_payload must return a writable, C-contiguous buffer")
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if view.nbytes < n:
            raise ValueError(f"alloc_payload({n}) returned only {view.nbytes} bytes")
        return view[:n]

    def _finish(self, payload: memoryview) -> None:
        assert self._header is not None
        self._frames.append(Frame(self._flags, self._header, payload, self._specs))
        self._header = None
        self._specs = ()
        self._phase = _PREFIX_PHASE


def _header_decoder(stream: io.BytesIO, limits: Limits, max_depth: int | None = None) -> cbor2.CBORDecoder:
    """A CBOR decoder of headers from `stream`: text keys only, no tags, no duplicate keys, `max_cbor_depth` deep
    (or `max_depth`)."""
    return cbor2.CBORDecoder(
        stream,
        max_depth=limits.max_cbor_depth if max_depth is None else max_depth,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
        semantic_decoders=_REJECT_TAGS,
        tag_hook=_reject_tag,
        object_hook=_check_keys,
    )


def _header_length_error(used: int, declared: int) -> ProtocolError:
    if used < declared:
        return ProtocolError(f"{declared - used} bytes follow the header's CBOR map inside its declared length")
    return ProtocolError(f"the header is not acceptable CBOR: its map runs past the declared {declared} bytes")


def _bad_prefix(
    magic: bytes, version: int, flags: int, reserved: int, header_nbytes: int, payload_nbytes: int, limits: Limits
) -> ProtocolError:
    """The error for a prefix that breaks a rule; the checks run in the order PROTOCOL.md lists the fields."""
    if magic != MAGIC:
        return _bad_magic(magic)
    if version != PROTOCOL_VERSION:
        return ProtocolError(
            f"the peer speaks protocol version {version}, this end speaks version {PROTOCOL_VERSION}",
            details={"peer_version": version, "version": PROTOCOL_VERSION},
        )
    if flags & ~FLAG_MORE:
        return ProtocolError(f"unknown frame flags {flags:#04x}; only MORE ({FLAG_MORE:#04x}) exists")
    if reserved:
        return ProtocolError(f"reserved prefix field is {reserved:#06x}, must be 0")
    if header_nbytes == 0:
        return ProtocolError("header length is 0; a header is one CBOR map")
    if header_nbytes > limits.max_header_nbytes:
        return FrameTooLarge(
            f"header of {header_nbytes} bytes exceeds the {limits.max_header_nbytes}-byte limit",
            details={"limit": "max_header_nbytes", "value": header_nbytes, "max": limits.max_header_nbytes},
        )
    return FrameTooLarge(
        f"payload of {payload_nbytes} bytes exceeds the {limits.max_payload_nbytes}-byte limit",
        details={"limit": "max_payload_nbytes", "value": payload_nbytes, "max": limits.max_payload_nbytes},
    )


def recv_frame(sock: socket.socket, decoder: Decoder) -> Frame:
    """Block until `decoder` holds a whole frame read from `sock`; return it.

    Raises ProtocolError on malformed input or a close mid-frame, ConnectionResetError
    on a close between frames; the socket's own timeout applies to each read.
    """
    while (frame := decoder.next_frame()) is None:
        n = sock.recv_into(decoder.get_buffer())
        if n == 0:
            decoder.feed_eof()
            raise ConnectionResetError("the peer closed the connection")
        decoder.buffer_updated(n)
    return frame


def send_frame(sock: socket.socket, parts: Sequence[Part]) -> None:
    """Write all of `parts` (from `encode_frame`) to a blocking socket with scatter-gather I/O."""
    pending = deque(view for view in map(_byte_view, parts) if view.nbytes)
    while pending:
        batch = [pending[i] for i in range(min(len(pending), _IOV_MAX))]
        sent = sock.sendmsg(batch)
        while sent:
            head = pending[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                pending.popleft()
            else:
                pending[0] = head[sent:]
                sent = 0
