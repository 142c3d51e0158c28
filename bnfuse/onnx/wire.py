"""The little of the protobuf wire format that bnfuse walks by hand.

Why by hand at all: protobuf parses a ModelProto whole, copying every weight
into the message, and serialises it whole again. On a 190 MB model that is
most of the time and twice the memory of the model (benchmarks/RESULTS.md).
bnfuse instead walks only the outer two levels (ModelProto -> graph ->
initializer -> raw_data) to find where each large weight's bytes lie, lets
protobuf parse everything else, and writes the weights back by copying byte
ranges. Nothing below the initializer level is ever interpreted here.

Format: a message is a sequence of fields, each a varint tag
``(number << 3) | wire_type`` followed by a varint (type 0), 8 bytes (1), a
varint length and that many bytes (2), or 4 bytes (5). Fields may come in any
order and a parser must accept that; we keep protobuf's own order (by field
number) when writing, so the bytes are those SerializeToString would give.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar, overload

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class FileBytes:
    """A file's bytes by index and slice, read in small windows with pread.

    For walking a model's outer levels without touching its weights: a
    memory-mapped file would do, but reading one byte of a mapping maps the
    whole page-cache folio around it (up to megabytes on recent kernels), and
    those pages count as this process's memory.
    """

    WINDOW = 1 << 14

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._size = fd, size
        self._start, self._data = 0, b""

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, key: int) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> bytes: ...
    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            start, stop, _ = key.indices(self._size)
            return os.pread(self._fd, max(0, stop - start), start)
        if not 0 <= key - self._start < len(self._data):
            self._start, self._data = key, os.pread(self._fd, self.WINDOW, key)
            if not self._data:
                raise IndexError(key)
        return self._data[key - self._start]


Buffer = bytes | bytearray | memoryview | FileBytes


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


class Field(NamedTuple):  # a tuple: made once per field walked, a dataclass costs 3x
    number: int
    wire_type: int
    start: int  # where the tag begins
    value_start: int  # where the value (for LEN: the payload) begins
    end: int  # one past the value
    value: int = 0  # the varint, for wire type 0


def read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    if pos < end:
        byte = buf[pos]
        if not byte & 0x80:  # one byte: most tags and lengths
            return byte, pos + 1
    result, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def len_prefix(number: int, length: int) -> bytes:
    """The tag and length that precede a LEN field's ``length`` bytes of payload."""
    return encode_varint(number << 3 | LEN) + encode_varint(length)


def fields(buf: Buffer, start: int, end: int) -> Iterator[Field]:
    """The fields of the message in ``buf[start:end]``, in the order they are stored."""
    pos = start
    while pos < end:
        tag, value_start = read_varint(buf, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise WireError("field number 0")
        value = 0
        if wire_type == VARINT:
            value, field_end = read_varint(buf, value_start, end)
        elif wire_type == I64:
            field_end = value_start + 8
        elif wire_type == I32:
            field_end = value_start + 4
        elif wire_type == LEN:
            length, value_start = read_varint(buf, value_start, end)
            field_end = value_start + length
        else:  # groups (3, 4) are deprecated and never used by ONNX
            raise WireError(f"unsupported wire type {wire_type}")
        if field_end > end:
            raise WireError("a field runs past the end of its message")
        yield Field(number, wire_type, pos, value_start, field_end, value)
        pos = field_end


def split_at(message: bytes, number: int) -> int:
    """Where a field numbered ``number`` goes in ``message`` to keep fields in number order."""
    for field in fields(message, 0, len(message)):
        if field.number > number:
            return field.start
    return len(message)


Piece = TypeVar("Piece")


def around_initializers(
    model: Any, initializers: list[Piece], length: Callable[[bytes | Piece], int]
) -> list[bytes | Piece]:
    """A ModelProto's bytes with its graph's initializers given apart, as ``initializers``
    (already serialised, each with its GraphProto field 5 tag; ``length`` tells any piece's
    size): the graph and the model are serialised without them, which takes them out of
    the message, and cut where the initializers (GraphProto field 5) and the graph
    (ModelProto field 7) go, as protobuf orders fields by number."""
    model.graph.ClearField("initializer")
    graph = model.graph.SerializeToString()
    cut = split_at(graph, 5)
    inner: list[bytes | Piece] = [graph[:cut], *initializers, graph[cut:]]
    model.ClearField("graph")
    outer = model.SerializeToString()
    cut = split_at(outer, 7)
    size = sum(length(piece) for piece in inner)
    return [outer[:cut] + len_prefix(7, size), *inner, outer[cut:]]
