"""An ONNX file's graph without its weights' bytes.

``light_proto`` walks the file's outer protobuf levels (bnfuse.onnx.wire) with
small reads and hands protobuf everything but the large initializers' raw
data, each of which becomes an external-data reference back into the file
itself (location INLINE, offset and length in bytes). Parsing is then as
fast on a 2 GB model as on a 2 MB one, and nothing is copied: bnfuse.onnx.io
maps those byte ranges as the weights, and the verifier needs no weights at
all.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bnfuse.onnx import wire
from bnfuse.onnx.proto import ModelProto, TensorProto

LITTLE_ENDIAN = sys.byteorder == "little"  # ONNX stores raw data little-endian
# Protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
PROTOBUF_LIMIT = 2**31
GRAPH_MARGIN = 64 * 2**20
# Files smaller than this are parsed by protobuf whole: reading each weight's place by
# hand costs Python time per initializer, which only pays off where copying the weights
# would cost more (memory and time grow with the file, not the graph).
LIGHT_FROM = 32 * 2**20

# Initializers with less raw data than this stay inside the message (as onnx's
# external-data threshold).
THRESHOLD = 1024
# Stands for "the .onnx file itself" in a light model; a NUL makes it a name no
# real data file can have.
INLINE = "\0bnfuse:inline"
# Types whose raw bytes are a numpy array of the same size (no 4-bit packing, no
# strings), with their element size.
MAPPABLE: dict[int, int] = {
    TensorProto.FLOAT: 4,
    TensorProto.DOUBLE: 8,
    TensorProto.FLOAT16: 2,
    TensorProto.BFLOAT16: 2,
    TensorProto.INT8: 1,
    TensorProto.UINT8: 1,
    TensorProto.INT16: 2,
    TensorProto.UINT16: 2,
    TensorProto.INT32: 4,
    TensorProto.UINT32: 4,
    TensorProto.INT64: 8,
    TensorProto.UINT64: 8,
}


# The element types numpy has of its own, as onnx.helper.tensor_dtype_to_np_dtype maps them.
_NATIVE: dict[int, np.dtype[Any]] = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.INT8: np.dtype(np.int8),
    TensorProto.UINT8: np.dtype(np.uint8),
    TensorProto.INT16: np.dtype(np.int16),
    TensorProto.UINT16: np.dtype(np.uint16),
    TensorProto.INT32: np.dtype(np.int32),
    TensorProto.UINT32: np.dtype(np.uint32),
    TensorProto.INT64: np.dtype(np.int64),
    TensorProto.UINT64: np.dtype(np.uint64),
}


def numpy_dtype(data_type: int) -> np.dtype[Any]:
    """The numpy dtype of an ONNX element type (bfloat16: ml_dtypes')."""
    native = _NATIVE.get(data_type)
    if native is not None:
        return native
    from onnx import helper  # bfloat16, float8...: onnx's table (and ml_dtypes) on first use

    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


def type_code(dtype: np.dtype[Any]) -> int | None:
    """The ONNX element type of a numpy dtype (None for one ONNX has not)."""
    for code, native in _NATIVE.items():
        if native == dtype:
            return code
    from onnx import helper

    try:
        return int(helper.np_dtype_to_tensor_dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return None


def type_name(code: int | None, dtype: np.dtype[Any]) -> str:
    """An element type as reports name it (``FLOAT16``); ``dtype`` stands in where the
    model declares none."""
    if code is None:
        code = type_code(dtype)
    if code is None or code not in _KNOWN:
        return str(dtype)
    return _KNOWN[code]


_KNOWN = {int(code): str(name) for name, code in TensorProto.DataType.items()}


_RAW: dict[int, np.dtype[Any]] = {}  # MAPPABLE's dtypes, little-endian as raw data is


def _raw_dtype(data_type: int) -> np.dtype[Any] | None:
    dtype = _RAW.get(data_type)
    if dtype is None and data_type in MAPPABLE:
        dtype = _RAW[data_type] = numpy_dtype(data_type).newbyteorder("<")
    return dtype


def whole_file_limit() -> int:
    """Files smaller than this are parsed by protobuf whole, and hold a model that one
    protobuf message can carry."""
    return min(LIGHT_FROM, PROTOBUF_LIMIT - GRAPH_MARGIN)


def raw_array(tensor: TensorProto) -> npt.NDArray[Any] | None:
    """A read-only view of ``tensor``'s raw_data, or None to let onnx's numpy_helper read it.

    The same array ``numpy_helper.to_array`` makes of raw_data in these types,
    without its per-call dispatch: on a 3,000-node graph with 5,000 small
    initializers that dispatch would show in loading, matching and writing
    alike. None for other types, other fields, big-endian hosts, and data that
    does not fill the tensor's shape (the load's checks then say why).
    """
    dtype = _raw_dtype(tensor.data_type)
    if dtype is None or not LITTLE_ENDIAN or not tensor.HasField("raw_data"):
        return None
    dims = tuple(tensor.dims)
    raw = tensor.raw_data
    if len(raw) != math.prod(dims) * dtype.itemsize:
        return None
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def light_proto(path: Path) -> Any:
    """The ModelProto with each large inline weight standing as a reference into the file.

    The weights' bytes are never read: enough for whoever needs the graph
    and not the values (the verifier's input and output lists). Only the
    top-level graph's initializers are taken out; everything else, subgraphs
    included, is parsed by protobuf as usual. None where the file is not
    protobuf (a text format) or has no single graph: ``onnx.load`` then reads
    it, and reports what is wrong in its own words. Raises wire.WireError at
    once where the outer levels are malformed, without reading the rest (a
    corrupt 3 GB file is refused in milliseconds, not after reading it whole).
    """
    import onnx.serialization  # only for a file this large: its import is small beside it

    fmt = onnx.serialization.registry.get_format_from_file_extension(path.suffix)
    if fmt not in (None, "protobuf") or not LITTLE_ENDIAN or not hasattr(os, "pread"):
        return None  # text formats; big-endian hosts; no pread (Windows): protobuf reads it
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = wire.FileBytes(fd, os.fstat(fd).st_size)
        graph_field: wire.Field | None = None
        model_parts: list[bytes | None] = []
        for f in wire.fields(buf, 0, len(buf)):
            if f.number == 7:  # ModelProto.graph
                if f.wire_type != wire.LEN or graph_field is not None:
                    return None
                graph_field = f
                model_parts.append(None)
            else:
                model_parts.append(buf[f.start : f.end])
        if graph_field is None:
            return None
        graph_parts: list[bytes] = []
        kept = graph_field.value_start  # where the run of fields kept as they are began
        for f in wire.fields(buf, graph_field.value_start, graph_field.end):
            # GraphProto.initializer, large enough to hold a large weight
            if f.number == 5 and f.wire_type == wire.LEN and f.end - f.value_start > THRESHOLD:
                light = _light_tensor(buf, f)
                if light is not None:  # its raw_data replaced by a reference
                    graph_parts += [buf[kept : f.start], wire.len_prefix(5, len(light)), light]
                    kept = f.end
        graph_parts.append(buf[kept : graph_field.end])  # one read per run, not per field
    finally:
        os.close(fd)
    graph_bytes = b"".join(graph_parts)
    model_bytes = b"".join(
        part if part is not None else wire.len_prefix(7, len(graph_bytes)) + graph_bytes
        for part in model_parts
    )
    return ModelProto.FromString(model_bytes)


def _light_tensor(buf: wire.FileBytes, field: wire.Field) -> bytes | None:
    """The TensorProto in ``field`` with its raw_data swapped for a reference, or None to keep it."""
    raw: wire.Field | None = None
    header: list[bytes] = []
    for f in wire.fields(buf, field.value_start, field.end):
        if f.number == 9 and f.wire_type == wire.LEN and raw is None:  # TensorProto.raw_data
            raw = f
        elif f.number in (9, 13, 14):  # raw_data twice, external_data, data_location
            return None
        else:
            header.append(buf[f.start : f.end])
    length = raw.end - raw.value_start if raw is not None else 0
    if raw is None or length < THRESHOLD:
        return None
    tensor = TensorProto.FromString(b"".join(header))
    count = math.prod(tensor.dims)
    if tensor.data_type not in MAPPABLE or count * MAPPABLE[tensor.data_type] != length:
        return None  # kept inline; the load's checks say what is wrong with it
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", INLINE), ("offset", raw.value_start), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    blob: bytes = tensor.SerializeToString()
    return blob
