"""Where each initializer's array lives, and how its bytes are written.

An initializer's values are in one of three places:

- in its TensorProto (raw_data, or a typed field): read as a view where it
  can be (light.raw_array), else through onnx's numpy_helper;
- in a mapped file (bnfuse.onnx.mapped): a large weight left in the .onnx
  (light.light_proto) or in external data; its TensorProto holds the header
  and an external-data reference, its array is a view of the file;
- folded by the rewrite: its TensorProto holds the header only, and the array
  is computed when the file is written (one layer at a time, so memory holds
  one folded weight, not all of them).

``Arrays`` answers for each TensorProto, by identity: the TensorProtos of a
model live as long as it does, and protobuf hands out the same object for the
same message while one is held (``_held`` holds them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfuse.fold import Array
from bnfuse.onnx.light import raw_array
from bnfuse.onnx.mapped import MappedFile

Compute = Callable[[], Array]


@dataclass(frozen=True)
class Mapped:
    """A tensor's bytes in a mapped file, and its array (a view of them)."""

    file: MappedFile
    offset: int
    array: Array

    @property
    def length(self) -> int:
        return int(self.array.nbytes)

    def release(self) -> None:
        self.file.release(self.offset, self.length)


class Arrays:
    """Each initializer's array, by its TensorProto."""

    def __init__(self) -> None:
        self._held: dict[int, Any] = {}  # id -> TensorProto, kept alive for stable ids
        self._mapped: dict[int, Mapped] = {}
        self._folded: dict[int, Array | Compute] = {}
        self._read: dict[int, Array] = {}  # the arrays of tensors in their message, once read

    def map(self, tensor: Any, where: Mapped) -> None:
        self._held[id(tensor)] = tensor
        self._mapped[id(tensor)] = where

    def fold(self, tensor: Any, array: Array | Compute) -> None:
        """``tensor`` now holds ``array`` (or what ``array()`` computes when it is read)."""
        self._held[id(tensor)] = tensor
        self._read.pop(id(tensor), None)
        self._folded[id(tensor)] = array  # read before its mapping (kept: ``release``)

    def mapped(self, tensor: Any) -> Mapped | None:
        """Where the tensor's bytes lie in a mapped file (as read: a folded one's are the
        weight it was folded from)."""
        return self._mapped.get(id(tensor))

    def of(self, tensor: Any) -> Array:
        """The tensor's array: a view where it can be; a folded one computed (not kept:
        memory holds the folded weights one at a time)."""
        key = id(tensor)
        folded = self._folded.get(key)
        if folded is not None:
            return folded() if callable(folded) else folded
        where = self._mapped.get(key)
        if where is not None:
            return where.array
        array = self._read.get(key)
        if array is None:  # a view of the bytes protobuf hands out (a copy of the message's)
            array = self._read[key] = proto_array(tensor)
            self._held[key] = tensor
        return array

    def release(self, tensor: Any) -> None:
        """Done reading a mapped weight for now: drop its pages from this process."""
        where = self._mapped.get(id(tensor)) if tensor is not None else None
        if where is not None:
            where.release()

    def apart(self, tensor: Any) -> bool:
        """Whether the tensor's data is kept apart from its message (mapped or folded)."""
        return id(tensor) in self._folded or id(tensor) in self._mapped

    def bytes_of(self, tensor: Any) -> Mapped | Array | None:
        """What to write as the tensor's raw data: its mapped bytes, its folded array
        (computed now, and not kept), or None: it is in its message."""
        key = id(tensor)
        folded = self._folded.get(key)
        if folded is not None:
            return folded() if callable(folded) else folded
        return self._mapped.get(key)  # unchanged: its bytes as they are in the file


def proto_array(tensor: Any) -> Array:
    """A TensorProto's values: a read-only view of its raw_data where that fills its
    shape, else onnx's own reading of it."""
    fast = raw_array(tensor)
    if fast is not None:
        return fast
    from onnx import numpy_helper

    array: Array = np.asarray(numpy_helper.to_array(tensor))
    return array
