"""Reading and writing ONNX files: the bytes, for bnfuse.onnx.graph's one engine.

A model is its protobuf. A file under light.LIGHT_FROM is parsed whole;
from there on (and whenever it has external data) the large weights never
pass through protobuf: parsing a model copies every weight into the message
and writing it copies them out again, which on a 190 MB model was 2.3 s and
860 MB of memory, against 0.1 s for ``cp``. ``load`` walks the outer protobuf
levels (light.light_proto) to find each large initializer's bytes and parses
everything else; those weights become read-only views of the memory-mapped
file (bnfuse.onnx.mapped, bnfuse.onnx.tensors), inline or in external data
alike. ``save`` serialises the message without them and writes each weight as
one byte range: an unchanged one is copied inside the kernel, a folded one is
computed when it is written. Memory stays near one layer, not one model. How
the bytes were read changes no decision and no output byte.

The writer writes the input's own message, less what the fold took out and
plus what it put in; no field is rewritten for a library's habits.

Writing is atomic: the model (and its external data) is written into a
temporary folder beside the output and renamed into place, so a failure never
leaves a partial file, and the input is never written to.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnfuse import outputs
from bnfuse.errors import BnfuseError, InputError, ModelError, first_line
from bnfuse.onnx import light, validate, wire
from bnfuse.onnx.graph import Graph, Model
from bnfuse.onnx.light import INLINE, MAPPABLE, THRESHOLD, light_proto
from bnfuse.onnx.mapped import MappedFile, copy_to
from bnfuse.onnx.proto import ModelProto, TensorProto, knows_opset
from bnfuse.onnx.tensors import Arrays, Mapped, proto_array

# Tensors smaller than this stay inside the protobuf message, when reading and when
# writing, inline or with external data (as onnx does).
EXTERNAL_THRESHOLD = THRESHOLD
# External tensors of ALIGN_FROM bytes or more start at a multiple of ALIGNMENT, so
# onnxruntime can map them.
ALIGNMENT = 4096
ALIGN_FROM = 64 * 2**10


@dataclass
class LoadedModel:
    model: Model
    path: Path
    data_files: set[Path] = field(default_factory=set)

    @property
    def has_external_data(self) -> bool:
        return bool(self.data_files)


def graph_tensors(model: Model) -> Iterator[tuple[Graph, Any]]:
    """Every initializer's TensorProto, with its graph (subgraphs too), in order."""
    for graph in model.graphs():
        for tensor in graph.proto.initializer:
            yield graph, tensor


def initializer_bytes(model: Model) -> int:
    return sum(nbytes(model.arrays, tensor) for _, tensor in graph_tensors(model))


def nbytes(arrays: Arrays, tensor: Any) -> int:
    """The tensor's size in bytes, from its dims where its type has whole bytes."""
    itemsize = MAPPABLE.get(tensor.data_type)
    if itemsize is not None:
        return int(math.prod(tensor.dims)) * itemsize
    return int(arrays.of(tensor).nbytes)


def load(path: Path) -> LoadedModel:
    """Read an ONNX file; its large weights stay on disk, mapped, until something reads them."""
    proto, whole_file = _checked_proto(path)
    arrays = Arrays()
    model = Model(proto, arrays)
    data_files: set[Path] = set()
    maps: dict[Path, MappedFile] = {}
    if whole_file is not None:
        maps[path.resolve()] = whole_file
    folder = path.resolve().parent
    for graph in model.graphs():
        _check_graph(graph, path)
    for tensor, attribute in _stored_tensors(model):
        data_file = _map_tensor(tensor, arrays, maps, folder, path, attribute=attribute)
        if data_file is not None:
            data_files.add(data_file)
    return LoadedModel(model=model, path=path, data_files=data_files)


def _stored_tensors(model: Model) -> Iterator[tuple[Any, bool]]:
    """Every TensorProto of the model, and whether it is a node attribute's (a Constant's
    value) rather than an initializer: those of each graph, then of the functions."""
    for graph in model.graphs():
        for tensor in graph.proto.initializer:
            yield tensor, False
        for tensor in _attribute_tensors(graph.proto.node):
            yield tensor, True
    for function in model.proto.functions:
        for tensor in _attribute_tensors(function.node):
            yield tensor, True


def _checked_proto(path: Path) -> tuple[Any, MappedFile | None]:
    """The file's ModelProto, checked (bnfuse.onnx.validate, IR version, opsets)."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        proto, whole_file = read_proto(path)
        proto.DiscardUnknownFields()  # fields this onnx does not define are not carried
        validate.check_model(proto, path)
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except Exception as exc:  # protobuf raises DecodeError...
        raise InputError(
            f"{path}: not a readable ONNX model ({_root_cause(exc)})",
            hint="expected an ONNX protobuf file (.onnx)",
        ) from exc
    if proto.ir_version <= 0 or not proto.opset_import:
        raise InputError(
            f"{path}: not an ONNX model (no IR version or opset import)",
            hint="expected an ONNX protobuf file (.onnx)",
        )
    _check_opsets(proto, path)
    return proto, whole_file


def _attribute_tensors(nodes: Iterable[Any]) -> Iterator[Any]:
    """The tensors in node attributes (a Constant's value), not those of subgraphs."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def _map_tensor(
    tensor: Any,
    arrays: Arrays,
    maps: dict[Path, MappedFile],
    folder: Path,
    path: Path,
    *,
    attribute: bool = False,
) -> Path | None:
    """Check a tensor; map it where its bytes lie in a file (the model itself, for
    weights left inline, or its external data). The external data file it reads, if any."""
    if tensor.data_location != TensorProto.EXTERNAL:
        if not attribute:
            _check_tensor(tensor, arrays, path)
        return None
    where = {e.key: e.value for e in tensor.external_data}
    location = where.get("location", "")
    inline = location == INLINE
    file = path.resolve() if inline else _check_external(tensor, where, folder, path)
    if tensor.data_type in MAPPABLE and light.LITTLE_ENDIAN:
        if file not in maps:
            maps[file] = _open_mapped(file, path)
        arrays.map(tensor, _mapped(tensor, where, maps[file], path))
    elif not inline:
        raise InputError(
            f"{path}: tensor '{tensor.name}' keeps its "
            f"{TensorProto.DataType.Name(tensor.data_type)} values in external data, which "
            "bnfuse does not read"
        )
    return None if inline else file


def read_proto(path: Path) -> tuple[Any, MappedFile | None]:
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
    """The whole file through protobuf (a text format through onnx, which knows them)."""
    if path.suffix.lower() == ".onnx":
        return ModelProto.FromString(path.read_bytes())
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _open_mapped(file: Path, path: Path) -> MappedFile:
    try:
        return MappedFile(file)
    except OSError as exc:
        raise InputError(f"{path}: cannot read {file.name} ({exc.strerror or exc})") from exc


def _mapped(tensor: Any, where: dict[str, str], file: MappedFile, path: Path) -> Mapped:
    """An external (or inline, taken out by light_proto) tensor as a view of its mapped file."""
    shape = tuple(int(d) for d in tensor.dims)
    dtype = light.numpy_dtype(tensor.data_type).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    try:
        offset = int(where.get("offset", 0))
        length = int(where["length"]) if "length" in where else file.size - offset
    except ValueError as exc:
        raise InputError(
            f"{path}: tensor '{tensor.name}' has an external-data offset or length that is "
            f"not a number ({exc})"
        ) from exc
    place = "its external data" if file.path.resolve() != path.resolve() else "the file"
    if length != expected:
        raise InputError(
            f"{path}: initializer '{tensor.name}' has {length} bytes in {place}, but its type "
            f"and shape {list(shape)} need {expected}"
        )
    try:
        array = file.array(offset, dtype, shape)
    except ValueError as exc:
        raise InputError(f"{path}: initializer '{tensor.name}': {exc}") from exc
    return Mapped(file, offset, array)


def _check_opsets(proto: Any, path: Path) -> None:
    versions = {o.domain: o.version for o in proto.opset_import}
    version = versions.get("", versions.get("ai.onnx"))
    if version is not None and not knows_opset(version):
        import onnx

        raise InputError(
            f"{path}: uses opset {version} of the default ONNX domain; this onnx "
            f"({onnx.__version__}) knows opsets up to {onnx.defs.onnx_opset_version()}",
            hint="upgrade onnx and onnxruntime, or export with an older opset",
        )


def _check_graph(graph: Graph, path: Path) -> None:
    """Every value is declared once; every node reads only values that exist before it
    (no cycle, nothing dangling)."""
    declared = dict.fromkeys(graph.input_info, "a graph input")
    declared.update(dict.fromkeys(graph.inits, "an initializer"))
    for node in graph.proto.node:
        for name in node.output:
            if name in declared:
                where = f" of graph '{graph.name}'" if graph.name else ""
                raise InputError(
                    f"{path}: '{name}'{where} is declared twice: as {declared[name]} and as an "
                    f"output of {node.op_type} '{node.name or name}' (ONNX values are "
                    "assigned once)"
                )
            if name:
                declared[name] = f"an output of {node.op_type} '{node.name or name}'"
    for node, name in graph.unresolved:
        made = graph.producer.get(name)
        if made is not None:
            raise InputError(
                f"{path}: node '{node.name}' reads '{name}' before '{made[0].name}' "
                "computes it (a cycle, or nodes out of topological order)"
            )
        raise InputError(
            f"{path}: node '{node.name}' reads '{name}', which no node, "
            "graph input or initializer provides"
        )


def _check_tensor(tensor: Any, arrays: Arrays, path: Path) -> None:
    """An inline initializer's data must fill its declared shape (read once: the matcher
    takes the same array)."""
    try:
        array = arrays.of(tensor)
        if array.shape != tuple(tensor.dims):
            raise ValueError(f"it holds {array.size} values")
    except (ValueError, TypeError) as exc:
        raise InputError(
            f"{path}: initializer '{tensor.name}' does not hold the data its type and shape "
            f"{list(tensor.dims)} declare ({exc})"
        ) from exc


def _check_external(tensor: Any, where: dict[str, str], folder: Path, path: Path) -> Path:
    """The resolved data file; refuse locations outside the model's folder, and missing files."""
    name = where.get("location", "")
    if not name or "\0" in name:
        raise InputError(
            f"{path}: tensor '{tensor.name}' names its external data file as "
            f"{name!r}, which is not a file name"
        )
    unknown = sorted(set(where) - {"location", "offset", "length", "checksum"})
    if unknown:  # a mangled "offset" would otherwise read the weight from offset 0
        raise InputError(
            f"{path}: tensor '{tensor.name}' has an external-data key bnfuse does not know "
            f"('{unknown[0]}')"
        )
    location = Path(name)
    data = (folder / location).resolve()
    if location.is_absolute() or not data.is_relative_to(folder):
        raise InputError(
            f"{path}: tensor '{tensor.name}' names external data at '{name}', "
            "outside the model's folder; bnfuse refuses to read it"
        )
    if not data.is_file():
        raise InputError(
            f"{path}: the external data file '{name}' of tensor '{tensor.name}' "
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


def save(model: Model, output: Path, *, external_data: bool, force: bool = False) -> list[Path]:
    """Write atomically (bnfuse.outputs' rules); returns the files written (model first).

    Once only: the message gives up its initializers' data on the way."""

    def write(tmpdir: Path) -> outputs.Staged:
        tmp_model, data = tmpdir / output.name, external_data_path(output)
        staged = []
        if not external_data:
            _write_inline(model, tmp_model)
        elif _write_external(model, tmp_model, tmpdir / data.name, data.name):
            staged.append((tmpdir / data.name, data))  # the data first: no model without it
        return [*staged, (tmp_model, output)]

    try:
        written = outputs.write_file(output, write, force=force)
    except (BnfuseError, MemoryError):
        raise
    except Exception as exc:  # protobuf cannot serialise what it read (e.g. text not UTF-8)
        raise ModelError(
            f"{output}: cannot write the model: {_root_cause(exc)}",
            hint="the input holds fields ONNX cannot store; check it with onnx.checker",
        ) from exc
    return [output, *(p for p in written if p != output)]


@dataclass
class _Streamed:
    """A weight written as a byte range, not through protobuf: its bytes are found (a
    folded one computed) only when it is written, one at a time."""

    tensor: Any  # its TensorProto
    arrays: Arrays
    length: int
    offset: int = 0  # in the external data file

    def data(self) -> Mapped | np.ndarray[Any, Any]:
        data = _data(self.arrays, self.tensor)
        assert data is not None, "only a weight kept apart from its message is streamed"
        return data


def _header(tensor: Any) -> Any:
    """The tensor's message without its data or external-data reference."""
    header = TensorProto()
    header.CopyFrom(tensor)
    for name in ("raw_data", "external_data", "data_location"):
        header.ClearField(name)
    return header


def _data(arrays: Arrays, tensor: Any) -> Mapped | np.ndarray[Any, Any] | None:
    """Bytes kept apart from the tensor's message: mapped, or a folded array (little-endian)."""
    data = arrays.bytes_of(tensor)
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    return data


def _write_inline(model: Model, path: Path) -> None:
    """One .onnx file, laid out as protobuf would, each large weight written as a byte range."""
    arrays, proto = model.arrays, model.proto
    for graph in list(model.graphs())[1:]:  # a subgraph's folded weights go in its message
        for tensor in graph.proto.initializer:
            data = _data(arrays, tensor)
            if data is not None:
                raw = _bytes(data)
                tensor.CopyFrom(_header(tensor))
                tensor.raw_data = raw
    pieces: list[bytes | _Streamed] = []
    for tensor in proto.graph.initializer:
        if not arrays.apart(tensor):
            blob = tensor.SerializeToString()
            pieces.append(wire.len_prefix(5, len(blob)) + blob)
            continue
        item = _Streamed(tensor, arrays, nbytes(arrays, tensor))
        header = _header(tensor).SerializeToString()
        later = tensor.HasField("doc_string") or any(  # fields 10, 11, 12, 16
            len(getattr(tensor, name)) for name in ("double_data", "uint64_data", "metadata_props")
        )
        cut = wire.split_at(header, 9) if later else len(header)  # raw_data's place
        head, tail = header[:cut], header[cut:]
        raw = wire.len_prefix(9, item.length)
        size = len(head) + len(raw) + item.length + len(tail)
        pieces += [wire.len_prefix(5, size) + head + raw, item, tail]
    _write_file(path, wire.around_initializers(proto, pieces, _length))


def _bytes(data: Mapped | np.ndarray[Any, Any]) -> bytes:
    array = data.array if isinstance(data, Mapped) else data
    return bytes(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)


def _length(piece: bytes | _Streamed) -> int:
    return piece.length if isinstance(piece, _Streamed) else len(piece)


def _write_external(model: Model, path: Path, data_path: Path, location: str) -> bool:
    """The model and its data file; False when no weight was large enough to go there."""
    streamed = []
    arrays = model.arrays
    for _, tensor in graph_tensors(model):
        if tensor.data_type == TensorProto.STRING:
            continue
        item = _Streamed(tensor, arrays, nbytes(arrays, tensor))
        if item.length >= EXTERNAL_THRESHOLD:
            if not arrays.apart(tensor):  # its message is about to lose its data
                arrays.fold(tensor, proto_array(tensor))
            streamed.append(item)
        elif arrays.apart(tensor):  # a small folded weight: in the message
            raw = _bytes(item.data())
            tensor.CopyFrom(_header(tensor))
            tensor.raw_data = raw
    offset = 0
    for item in streamed:
        if item.length >= ALIGN_FROM:
            offset = -(-offset // ALIGNMENT) * ALIGNMENT
        item.offset = offset
        offset += item.length
        header = _header(item.tensor)
        for name in validate.TYPED_FIELDS:
            header.ClearField(name)
        header.data_location = TensorProto.EXTERNAL
        where = {"location": location, "offset": item.offset, "length": item.length}
        for key, value in where.items():
            entry = header.external_data.add()
            entry.key, entry.value = key, str(value)
        item.tensor.CopyFrom(header)
    if streamed:
        _write_file(data_path, streamed, at_offsets=True)
    _write_file(path, [model.proto.SerializeToString()])
    return bool(streamed)


def inferred_shapes(model: Model) -> dict[str, tuple[int | None, ...]]:
    """Every value's shape as onnx's shape inference works it out ({} if it cannot).

    Inference runs on a copy of the model whose initializers are references (no
    bytes are read), and the model is not changed: what bnfuse writes keeps the
    input's own value_info.
    """
    import onnx

    copy = graph_only(model.proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, strict_mode=False, data_prop=True)
    except Exception:  # a graph onnx cannot infer: no shapes, as before
        return {}
    shapes: dict[str, tuple[int | None, ...]] = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            )
    return shapes


def graph_only(proto: Any) -> Any:
    """A copy of the ModelProto whose initializers hold no data of their own: each large or
    data-less one (a folded weight, until written) is an external reference that nothing
    reads; small ones keep their values, for shape inference to propagate (Expand to a
    constant shape). For onnx's shape inference and the verifier, which need the graph and
    not the weights."""
    copy = ModelProto()
    copy.CopyFrom(proto)
    for graph in validate.all_graphs(copy.graph):
        for tensor in graph.initializer:
            raw = tensor.HasField("raw_data")
            typed = any(len(getattr(tensor, name)) for name in validate.TYPED_FIELDS)
            if tensor.data_location != TensorProto.EXTERNAL and (
                (raw and len(tensor.raw_data) >= EXTERNAL_THRESHOLD) or not (raw or typed)
            ):
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
                entry = tensor.external_data.add()
                entry.key, entry.value = "location", "bnfuse-graph-only"
    return copy


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
            _write_data(fd, piece)
    finally:
        os.close(fd)


def _write_data(fd: int, item: _Streamed) -> None:
    """Append a weight's raw bytes: copied in the kernel if it is unchanged from a file."""
    data = item.data()
    if isinstance(data, Mapped):
        copy_to(data.file, data.offset, data.length, fd)
        return
    view = data.reshape(-1).view(np.uint8).data
    if len(view) != item.length:
        raise ModelError(
            f"tensor '{item.tensor.name}' gives {len(view)} bytes, its type and shape {item.length}"
        )
    outputs.write_all(fd, view)


def _root_cause(exc: BaseException) -> str:
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = first_line(root)
    return f"{type(root).__name__}: {text[:200]}" if text else type(root).__name__
