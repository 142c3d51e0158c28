"""Loading and writing ONNX files.

The in-memory graph is onnx-ir's (``onnx_ir``), chosen over raw ``onnx``
protobuf because it gives use-def chains across subgraphs and safe
initializer replacement; we do not hand-write use-def or topological order.

The weights are another matter. Parsing a model through protobuf copies every
weight into the message and writing it copies them out again: on a 190 MB
model that was 2.3 s and 860 MB of memory, against 0.1 s for ``cp``. So the
large weights never pass through protobuf. ``load`` walks the outer protobuf
levels (bnfuse.onnx.wire) to find each large initializer's bytes and gives
onnx-ir everything else; the weights become read-only views of the
memory-mapped file (bnfuse.onnx.mapped), inline or in external data alike.
``save`` serialises the graph without them and writes each weight as one
byte range: an unchanged one is copied inside the kernel, a folded one is
computed when it is written. Memory stays near one layer, not one model.

Why not onnx-ir's own external-data writer (``ir.save``): it reads every
weight into memory to write it. Saving a model with 400 MB of external data,
measured in one process each: bnfuse's writer peaks at 76 MB of resident
memory, ``ir.save`` (onnx-ir 1.1.0) at 486 MB, in 0.4 s and 0.3 s; and it
follows a symlink at the destination, which bnfuse's output rules refuse.

Writing is atomic: the model (and its external data) is written into a
temporary folder beside the output and renamed into place, so a failure never
leaves a partial file, and the input is never written to.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from bnfuse import outputs
from bnfuse.errors import BnfuseError, InputError, ModelError, first_line
from bnfuse.onnx import light, mapped, validate, wire
from bnfuse.onnx.constants import array_of
from bnfuse.onnx.light import INLINE, MAPPABLE, THRESHOLD, light_proto
from bnfuse.onnx.mapped import MappedFile

# Tensors smaller than this stay inside the protobuf message, when reading and when
# writing, inline or with external data (as onnx does).
EXTERNAL_THRESHOLD = THRESHOLD
# External tensors of ALIGN_FROM bytes or more start at a multiple of ALIGNMENT, so
# onnxruntime can map them.
ALIGNMENT = 4096
ALIGN_FROM = 64 * 2**10


@dataclass
class LoadedModel:
    model: ir.Model
    path: Path
    data_files: set[Path] = field(default_factory=set)

    @property
    def has_external_data(self) -> bool:
        return bool(self.data_files)


def initializer_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += nbytes(value.const_value)
    return total


def nbytes(tensor: ir.TensorProtocol) -> int:
    """The tensor's size in bytes; for an in-memory tensor from its array, and for one
    still in its protobuf from the proto's dims: much cheaper than onnx-ir's count
    from an ir.Shape (it shows on a 3,000-node graph)."""
    if isinstance(tensor, ir.Tensor) and tensor.dtype in MAPPABLE:  # whole bytes per element
        return int(tensor.numpy().nbytes)
    if isinstance(tensor, ir.serde.TensorProtoTensor):
        itemsize = MAPPABLE.get(tensor.raw.data_type)
        if itemsize is not None:
            return int(math.prod(tensor.raw.dims)) * itemsize
    return int(tensor.nbytes)


def load(path: Path) -> LoadedModel:
    """Read an ONNX file; its large weights stay on disk, mapped, until something reads them."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        with _onnx_ir_quiet():
            proto, whole_file = _read_proto(path)
            validate.check_model(proto, path)
            model = ir.serde.deserialize_model(proto)
            ir.external_data.set_base_dir(model.graph, path.resolve().parent)
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except Exception as exc:  # protobuf raises DecodeError, onnx-ir SerdeError...
        raise InputError(
            f"{path}: not a readable ONNX model ({_root_cause(exc)})",
            hint="expected an ONNX protobuf file (.onnx)",
        ) from exc
    if model.ir_version <= 0 or not model.opset_imports:
        raise InputError(
            f"{path}: not an ONNX model (no IR version or opset import)",
            hint="expected an ONNX protobuf file (.onnx)",
        )
    _check_opsets(model, path)
    data_files: set[Path] = set()
    maps: dict[Path, MappedFile] = {}
    if whole_file is not None:
        maps[path.resolve()] = whole_file
    folder = path.resolve().parent
    for graph in model.graphs():
        _check_graph(graph, path)
        for value in graph.initializers.values():
            data_file = _map_initializer(value, maps, folder, path)
            if data_file is not None:
                data_files.add(data_file)
        data_files.update(_attribute_data_files(graph, folder, path))
    for function in model.functions.values():
        data_files.update(_attribute_data_files(function, folder, path))
    return LoadedModel(model=model, path=path, data_files=data_files)


def _map_initializer(
    value: ir.Value, maps: dict[Path, MappedFile], folder: Path, path: Path
) -> Path | None:
    """Check an initializer; map it where its bytes lie in a file (the model itself, for
    weights left inline, or its external data). The external data file it reads, if any."""
    tensor = value.const_value
    if not isinstance(tensor, ir.ExternalTensor):
        if tensor is not None:
            _check_tensor(tensor, path)
        return None
    inline = str(tensor.location) == INLINE
    file = path.resolve() if inline else _check_external(tensor, folder, path)
    if tensor.dtype in MAPPABLE and light.LITTLE_ENDIAN:
        if file not in maps:
            maps[file] = _open_mapped(file, path)
        value.const_value = _mapped_tensor(tensor, maps[file], path)
    return None if inline else file


@contextmanager
def _onnx_ir_quiet() -> Iterator[None]:
    """onnx-ir logs warnings about graphs it reads or writes; bnfuse says what matters itself.

    One warning is an error here: an external-data key it does not know (a
    mangled "offset" would otherwise read the weight from offset 0).
    """
    log = logging.getLogger("onnx_ir")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("error", message="Ignoring unknown external data key")
            yield
    finally:
        log.setLevel(level)


def _read_proto(path: Path) -> tuple[Any, MappedFile | None]:
    """The ModelProto; with the file mapped where its large inline weights were left in it."""
    size = path.stat().st_size
    try:
        if size < light.LIGHT_FROM:
            try:
                return _parse(path), None
            except Exception:  # protobuf's words are vaguer: walk it for the exact fault
                light_proto(path)
                raise
        proto = light_proto(path)
    except wire.WireError as exc:
        raise InputError(
            f"{path}: not a readable ONNX model (malformed protobuf: {exc})",
            hint="expected an ONNX protobuf file (.onnx)",
        ) from exc
    if proto is not None:
        return proto, MappedFile(path)
    if size >= light.PROTOBUF_LIMIT:  # protobuf would read it whole, then fail
        raise InputError(
            f"{path}: not a readable ONNX model (over 2 GB, and not in the layout of one)"
        )
    return _parse(path), None


def _parse(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _open_mapped(file: Path, path: Path) -> MappedFile:
    try:
        return MappedFile(file)
    except OSError as exc:
        raise InputError(f"{path}: cannot read {file.name} ({exc.strerror or exc})") from exc


def _mapped_tensor(tensor: ir.ExternalTensor, file: MappedFile, path: Path) -> ir.TensorProtocol:
    """An external (or inline, taken out by light_proto) tensor as a view of its mapped file."""
    shape = tuple(int(d) for d in tensor.shape.numpy())
    dtype = tensor.dtype.numpy()
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    offset = tensor.offset or 0
    length = tensor.length if tensor.length is not None else file.size - offset
    where = "its external data" if file.path.resolve() != path.resolve() else "the file"
    if length != expected:
        raise InputError(
            f"{path}: initializer '{tensor.name}' has {length} bytes in {where}, but its type "
            f"and shape {list(shape)} need {expected}"
        )
    try:
        array = file.array(offset, dtype, shape)
    except ValueError as exc:
        raise InputError(f"{path}: initializer '{tensor.name}': {exc}") from exc
    return mapped.MappedTensor(
        file,
        offset,
        array,
        dtype=tensor.dtype,
        name=tensor.name,
        doc_string=tensor.doc_string,
        metadata_props=dict(tensor.metadata_props) or None,
    )


def _attribute_data_files(nodes: Iterable[ir.Node], folder: Path, path: Path) -> set[Path]:
    """External data of tensors in node attributes (a Constant's value): checked like weights."""
    files = set()
    for node in nodes:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                tensors = [attr.as_tensor()]
            elif attr.type == ir.AttributeType.TENSORS:
                tensors = list(attr.as_tensors())
            else:
                continue
            for tensor in tensors:
                if isinstance(tensor, ir.ExternalTensor):
                    files.add(_check_external(tensor, folder, path))
    return files


def _check_opsets(model: ir.Model, path: Path) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is not None and version > newest:
        raise InputError(
            f"{path}: uses opset {version} of the default ONNX domain; this onnx "
            f"({onnx.__version__}) knows opsets up to {newest}",
            hint="upgrade onnx and onnxruntime, or export with an older opset",
        )


def _check_graph(graph: ir.Graph, path: Path) -> None:
    """Every node reads only values that exist before it (no cycle, nothing dangling)."""
    known: set[ir.Value] = set(graph.inputs) | set(graph.initializers.values())
    for node in graph:
        for value in node.inputs:
            if value is None or value in known:
                continue
            producer = value.producer()
            if (
                producer is None
                and value.const_value is None
                and value.graph is None
                and not value.is_graph_input()
            ):
                raise InputError(
                    f"{path}: node '{node.name}' reads '{value.name}', which no node, "
                    "graph input or initializer provides"
                )
            if producer is not None and producer.graph is graph:
                raise InputError(
                    f"{path}: node '{node.name}' reads '{value.name}' before '{producer.name}' "
                    "computes it (a cycle, or nodes out of topological order)"
                )
        known.update(node.outputs)


def _check_tensor(tensor: ir.TensorProtocol, path: Path) -> None:
    """An inline initializer's data must fill its declared shape (a view: no copy)."""
    try:
        array_of(tensor)
    except (ValueError, TypeError) as exc:
        raise InputError(
            f"{path}: initializer '{tensor.name}' does not hold the data its type and shape "
            f"{list(tensor.shape.numpy()) if tensor.shape is not None else '?'} declare ({exc})"
        ) from exc


def _check_external(tensor: ir.ExternalTensor, folder: Path, path: Path) -> Path:
    """The resolved data file; refuse locations outside the model's folder, and missing files."""
    if not isinstance(tensor.location, str) or not tensor.location or "\0" in tensor.location:
        raise InputError(
            f"{path}: tensor '{tensor.name}' names its external data file as "
            f"{tensor.location!r}, which is not a file name"
        )
    location = Path(tensor.location)
    data = (Path(tensor.base_dir) / location).resolve()
    if location.is_absolute() or not data.is_relative_to(folder):
        raise InputError(
            f"{path}: tensor '{tensor.name}' names external data at '{tensor.location}', "
            "outside the model's folder; bnfuse refuses to read it"
        )
    if not data.is_file():
        raise InputError(
            f"{path}: the external data file '{tensor.location}' of tensor '{tensor.name}' "
            "is missing (it must lie beside the model)"
        )
    return data


def output_targets(source: LoadedModel, output: Path) -> list[tuple[str, Path]]:
    """The files writing ``output`` creates: the model, and its external data file if any."""
    targets = [("output", output)]
    if needs_external_data(source):
        targets.append(("the output's external data", external_data_path(output)))
    return targets


def files_read(source: LoadedModel) -> list[tuple[str, Path]]:
    """Every file the model is read from: the .onnx and its external data files."""
    data = [("the input's external data file", p) for p in sorted(source.data_files)]
    return [("the input model", source.path), *data]


def external_data_path(output: Path) -> Path:
    return output.with_name(output.name + ".data")


def needs_external_data(source: LoadedModel) -> bool:
    """External data when the input had it, or when one protobuf could not hold the model."""
    return source.has_external_data or (
        initializer_bytes(source.model) + light.GRAPH_MARGIN >= light.PROTOBUF_LIMIT
    )


def save(model: ir.Model, output: Path, *, external_data: bool, force: bool = False) -> list[Path]:
    """Write atomically (bnfuse.outputs' rules); returns the files written (model first)."""

    def write(tmpdir: Path) -> outputs.Staged:
        tmp_model, data = tmpdir / output.name, external_data_path(output)
        staged = []
        with _onnx_ir_quiet():
            if not external_data:
                _write_inline(model, tmp_model)
            elif _write_external(model, tmp_model, tmpdir / data.name, data.name):
                staged.append((tmpdir / data.name, data))  # the data first: no model without it
        return [*staged, (tmp_model, output)]

    try:
        written = outputs.write_file(output, write, force=force)
    except (BnfuseError, MemoryError):
        raise
    except Exception as exc:  # onnx-ir cannot serialise what it read (e.g. text not UTF-8)
        raise ModelError(
            f"{output}: cannot write the model: {_root_cause(exc)}",
            hint="the input holds fields ONNX cannot store; check it with onnx.checker",
        ) from exc
    return [output, *(p for p in written if p != output)]


@dataclass
class _Streamed:
    """A weight written as a byte range, not through protobuf."""

    value: ir.Value
    tensor: ir.TensorProtocol
    offset: int = 0  # in the external data file


def _streamed(graphs: Iterable[ir.Graph], *, all_types: bool) -> list[_Streamed]:
    out = []
    for graph in graphs:
        for value in graph.initializers.values():
            tensor = value.const_value
            if (
                tensor is not None
                and not isinstance(tensor, ir.StringTensor)
                and (all_types or tensor.dtype in MAPPABLE)
                and nbytes(tensor) >= EXTERNAL_THRESHOLD
            ):
                out.append(_Streamed(value, tensor))
    return out


def _serialize_without(model: ir.Model, streamed: list[_Streamed], location: str) -> Any:
    """The ModelProto with each streamed weight as an external reference (offset: its place)."""
    for item in streamed:
        t = item.tensor
        item.value.const_value = ir.ExternalTensor(
            location,
            item.offset,
            nbytes(t),
            t.dtype,
            shape=ir.Shape(t.shape.numpy()),
            name=t.name or item.value.name or "",
            doc_string=t.doc_string,
            metadata_props=dict(t.metadata_props) or None,
        )
    try:
        return ir.serde.serialize_model(model)
    finally:
        for item in streamed:
            item.value.const_value = item.tensor


def inferred_shapes(model: ir.Model) -> dict[str, tuple[int | None, ...]]:
    """Every value's shape as onnx's shape inference works it out ({} if it cannot).

    Inference runs on a copy of the graph whose large weights are references
    (no bytes are read), and the model is not changed: what bnfuse writes keeps
    the input's own value_info.
    """
    import onnx

    streamed = _streamed(model.graphs(), all_types=True)
    proto = _serialize_without(model, streamed, "bnfuse-shape-inference")
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # a graph onnx cannot infer: no shapes, as before
        return {}
    shapes: dict[str, tuple[int | None, ...]] = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim
            )
    return shapes


def _write_inline(model: ir.Model, path: Path) -> None:
    """One .onnx file, laid out as protobuf would, each large weight written as a byte range."""
    import onnx

    streamed = _streamed([model.graph], all_types=False)
    for index, item in enumerate(streamed):
        item.offset = index
    proto = _serialize_without(model, streamed, INLINE)
    pieces: list[bytes | _Streamed] = []
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and any(
            e.key == "location" and e.value == INLINE for e in tensor.external_data
        ):
            item = streamed[int(next(e.value for e in tensor.external_data if e.key == "offset"))]
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
            header = tensor.SerializeToString()
            cut = wire.split_at(header, 9)  # raw_data's place among the fields
            head, tail = header[:cut], header[cut:]
            raw = wire.len_prefix(9, nbytes(item.tensor))
            size = len(head) + len(raw) + nbytes(item.tensor) + len(tail)
            pieces += [wire.len_prefix(5, size) + head + raw, item, tail]
        else:
            blob = tensor.SerializeToString()
            pieces.append(wire.len_prefix(5, len(blob)) + blob)
    _write_file(path, wire.around_initializers(proto, pieces, _length))


def _length(piece: bytes | _Streamed) -> int:
    return nbytes(piece.tensor) if isinstance(piece, _Streamed) else len(piece)


def _write_external(model: ir.Model, path: Path, data_path: Path, location: str) -> bool:
    """The model and its data file; False when no weight was large enough to go there."""
    streamed = _streamed(model.graphs(), all_types=True)
    offset = 0
    for item in streamed:
        if nbytes(item.tensor) >= ALIGN_FROM:
            offset = -(-offset // ALIGNMENT) * ALIGNMENT
        item.offset = offset
        offset += nbytes(item.tensor)
    proto = _serialize_without(model, streamed, location)
    if streamed:
        _write_file(data_path, streamed, at_offsets=True)
    _write_file(path, [proto.SerializeToString()])
    return bool(streamed)


def _write_file(
    path: Path, pieces: Iterable[bytes | _Streamed], *, at_offsets: bool = False
) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        for piece in pieces:
            if isinstance(piece, bytes):
                outputs.write_all(fd, piece)
                continue
            if at_offsets:
                os.lseek(fd, piece.offset, os.SEEK_SET)
            _write_tensor(fd, piece.tensor)
    finally:
        os.close(fd)


def _write_tensor(fd: int, tensor: ir.TensorProtocol) -> None:
    """Append the tensor's raw bytes: copied in the kernel if it is unchanged from a file."""
    n = nbytes(tensor)
    if isinstance(tensor, mapped.MappedTensor):
        tensor.copy_to(fd)
        return
    if isinstance(tensor, (ir.Tensor, ir.LazyTensor)) and tensor.dtype in MAPPABLE:
        array = tensor.numpy()  # ir.Tensor: its array, no copy; LazyTensor: computed now
        data: bytes | memoryview = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
    else:
        data = tensor.tobytes()
    if len(data) != n:
        raise ModelError(f"tensor '{tensor.name}' gives {len(data)} bytes, its type and shape {n}")
    outputs.write_all(fd, data)


def _root_cause(exc: BaseException) -> str:
    root = exc
    while root.__cause__ is not None:  # onnx-ir wraps the real reason
        root = root.__cause__
    text = first_line(root)
    return f"{type(root).__name__}: {text[:200]}" if text else type(root).__name__
