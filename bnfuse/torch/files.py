"""PyTorch files: load safely, fuse, write.

Formats (bnfuse.formats recognises them from a zip archive's entries):

  TorchScript      ``torch.jit.save``: entries ``*/code/`` and ``*/constants.pkl``
  ExportedProgram  ``torch.export.save`` (.pt2): entry ``*/archive_format``
  pickle           ``torch.save``: entry ``*/data.pkl`` only (or a legacy pickle)

A pickle can run arbitrary code when loaded, so a full pickled module
(``torch.save(model)``) is refused unless ``trust_pickle`` is set; a bare
state_dict (loaded with ``weights_only=True``, which runs no code) is refused
with a hint to use the Python API, since it holds no architecture to fuse.
A .pt2 archive is read only when its weights and constants are raw tensors
(torch.export.load would unpickle entries stored as pickles: those need
``trust_pickle`` too). TorchScript archives restore TorchScript types only.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from bnfuse import outputs
from bnfuse.errors import BnfuseError, InputError, ModelError, OutputError, first_line
from bnfuse.formats import Format
from bnfuse.result import FuseResult


def load_pickle(path: Path, trust_pickle: bool) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_exc:
        if not trust_pickle:
            raise InputError(
                f"{path}: a full pickled model (torch.save(model)); loading it runs code "
                "stored in the file",
                hint="pass --trust-pickle if you trust it, or save it with torch.jit.save / "
                "torch.export.save",
            ) from safe_exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as exc:
            # the pickle names a class by its module: that module must be importable
            raise InputError(
                f"{path}: the pickled model needs code that is not importable here "
                f"({type(exc).__name__}: {first_line(exc)})",
                hint="put the module that defines its classes on PYTHONPATH, or load the "
                "model in your own code and call bnfuse.fuse(module)",
            ) from exc
    if isinstance(obj, Mapping):
        raise InputError(
            f"{path}: a state_dict (weights without the architecture), nothing to fuse",
            hint="load it into your nn.Module and call bnfuse.fuse(module) from Python",
        )
    if not isinstance(obj, nn.Module):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not an nn.Module")
    return obj


def load_exported(path: Path, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    from bnfuse.torch import archive

    guard: Any = contextlib.nullcontext()
    if not trust_pickle:
        try:
            why = archive.check(path)
        except Exception as exc:
            raise InputError(f"{path}: not a readable .pt2 archive ({type(exc).__name__})") from exc
        if why is not None:
            raise InputError(
                f"{path}: loading this ExportedProgram would run code stored in the file ({why})",
                hint="pass --trust-pickle if you trust the file to run its own code",
            )
        guard = archive.guard()
    try:
        with guard:
            return torch.export.load(path)
    except Exception as exc:
        raise InputError(
            f"{path}: cannot load it as an ExportedProgram ({type(exc).__name__})"
        ) from exc


def load_script(path: Path, trust: bool = False) -> torch.jit.ScriptModule:
    """The TorchScript module in ``path``; unless ``trust``, only once its code is known
    to call pure tensor arithmetic and to run nothing on load (bnfuse.torch.script_archive)."""
    if not trust:
        from bnfuse.torch import script_archive

        try:
            why = script_archive.check(path)
        except Exception as exc:
            raise InputError(
                f"{path}: not a readable TorchScript archive ({type(exc).__name__})"
            ) from exc
        if why is not None:
            raise InputError(
                f"{path}: this TorchScript module would run code stored in the file, beyond "
                f"tensor arithmetic ({why})",
                hint="pass --trust-pickle if you trust the file to run its own code",
            )
    try:
        module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise InputError(f"{path}: cannot load it as TorchScript ({type(exc).__name__})") from exc
    return module


def script_input_names(module: torch.jit.ScriptModule) -> list[str]:
    return [v.debugName().split(".")[0] for v in list(module.graph.inputs())[1:]]


def script_example_inputs(
    module: torch.jit.ScriptModule, input_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[torch.Tensor, ...] | None:
    """Zeros of the shapes given by name (``--input-shape``), in the module's input dtype.

    A saved TorchScript module records no input shapes, so they come from the user.
    """
    return named_zeros(module, script_input_names(module), input_shapes)


def named_zeros(
    module: Any, names: list[str], input_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[torch.Tensor, ...] | None:
    """Zeros for each named input in the module's input dtype; None unless all are given."""
    if not names or any(n not in input_shapes for n in names):
        return None
    from bnfuse.torch.tensors import input_dtype

    dtype = input_dtype(module)
    return tuple(torch.zeros(input_shapes[n], dtype=dtype) for n in names)


def exported_dynamic_shapes(ep: torch.export.ExportedProgram) -> tuple[Any, ...]:
    """Keep each symbolic dimension of the user inputs dynamic when exporting again."""
    shapes = []
    user = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        dims = {
            i: torch.export.Dim.AUTO
            for i, d in enumerate(getattr(val, "shape", ()))
            if isinstance(d, torch.SymInt)
        }
        shapes.append(dims or None)
    return tuple(shapes)


def _atomic(output: Path, write: Callable[[Path], None], *, force: bool) -> None:
    def staged(tmpdir: Path) -> outputs.Staged:
        write(tmpdir / output.name)
        return [(tmpdir / output.name, output)]

    try:
        outputs.write_file(output, staged, force=force)
    except (BnfuseError, MemoryError):
        raise
    except Exception as exc:  # torch serialisation: e.g. a damaged record it reads only now
        raise ModelError(
            f"{output}: torch cannot write the fused model "
            f"({type(exc).__name__}: {first_line(exc)[:200]})",
            hint="TorchScript reads some records of its input only when saving; check that the "
            "input loads and saves in torch",
        ) from exc


def export_onnx(module: nn.Module, args: tuple[Any, ...], path: Path, names: list[str]) -> None:
    """Write the (fused) module as ONNX: TorchScript-based exporter, opset 17.

    Inputs keep their TorchScript names, outputs are named ``output_0``,
    ``output_1``... (as the verifier names them), and the batch dimension
    (axis 0) of every input and output stays dynamic.
    """
    import warnings

    with torch.no_grad():
        produced = module(*args)
    count = len(produced) if isinstance(produced, (tuple, list)) else 1
    output_names = [f"output_{i}" for i in range(count)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=17, input_names=names,
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in names + output_names},
        )  # fmt: skip


def export_onnx_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """Write an ExportedProgram as ONNX with torch's torch.export-based exporter.

    The exporter's graph is tidied as its ``optimize=True`` would (constants
    folded, unused nodes, duplicate initializers and common subexpressions
    removed) but without onnxscript's own BatchNorm fusion rules: those would
    fold, in their own arithmetic, a BatchNorm that bnfuse left in place on
    purpose (one whose fold overflows fp16, say).
    """
    import logging
    import warnings

    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # it warns about torchvision ops it skips
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, dynamo=True, optimize=False, verbose=False)
            if onnx_program is None:
                raise BnfuseError("torch.onnx.export returned no program")
            _tidy(onnx_program.model)
    finally:
        exporter_log.setLevel(level)
    onnx_program.save(str(path))


def _tidy(model: Any) -> None:
    """onnxscript's constant folding and onnx-ir's clean-up passes, no rewrite rules."""
    from onnx_ir.passes import common
    from onnxscript import optimizer

    optimizer.fold_constants(model)
    for step in (
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
    ):
        step(model)


def fuse_torch_file(
    input: Path,
    output: Path | None,
    fmt: Format,
    *,
    force: bool = False,
    dry_run: bool = False,
    trust_pickle: bool = False,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    also_writes: Sequence[tuple[str, Path]] = (),
    also_reads: Sequence[tuple[str, Path]] = (),
) -> FuseResult:
    """Fuse a TorchScript, .pt2 or (trusted) pickle file into ``output``.

    The output format follows its suffix: ``.onnx`` exports the fused model to
    ONNX; otherwise the input's own format.
    """
    targets = [*also_writes]
    if output is not None and not dry_run:
        targets.insert(0, ("output", output))
    outputs.check_targets(targets, [("the input model", input), *also_reads], force=force)
    to_onnx = output is not None and output.suffix.lower() == ".onnx"
    if fmt is Format.TORCHSCRIPT:
        result, write = _fuse_script(input, to_onnx, trust_pickle, input_shapes or {})
    else:
        result, write = _fuse_fx(input, fmt, to_onnx, trust_pickle, input_shapes or {})
    result.input = input
    result.dry_run = dry_run or output is None
    if not result.dry_run:
        assert output is not None
        _atomic(output, write, force=force)
        result.outputs = [output]
    return result


Writer = Callable[[Path], None]


def _fuse_script(
    input: Path, to_onnx: bool, trust: bool, input_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[FuseResult, Writer]:
    from bnfuse.torch.script_fuse import fuse_script_module

    script = load_script(input, trust)
    example = script_example_inputs(script, input_shapes)
    fused, result = fuse_script_module(script, example)

    def write(path: Path) -> None:
        if not to_onnx:
            torch.jit.save(fused, str(path))
            return
        if example is None:
            names = ", ".join(script_input_names(script))
            raise BnfuseError(
                f"{input}: exporting TorchScript to ONNX needs the input shapes",
                hint=f"pass --input-shape for each input ({names}), e.g. NAME:1x3x224x224",
            )
        export_onnx(fused, example, path, script_input_names(script))

    return result, write


def _fuse_fx(
    input: Path,
    fmt: Format,
    to_onnx: bool,
    trust_pickle: bool,
    input_shapes: Mapping[str, tuple[int, ...]],
) -> tuple[FuseResult, Writer]:
    """Fuse through torch.fx: a .pt2's module(), or a trusted pickled nn.Module.

    The result is written as .pt2 (torch.export again, dynamic dimensions kept)
    or .onnx. A pickle is never written: torch.fx modules do not pickle
    reliably, and a .pt2 loads without running code.
    """
    from bnfuse.torch.fx_fuse import fuse_graph_module, op_counts

    args: tuple[Any, ...] | None = None
    dynamic: tuple[Any, ...] = ()
    if fmt is Format.EXPORTED:
        ep = load_exported(input, trust_pickle)
        gm: fx.GraphModule = ep.module()
        args = tuple(ep.example_inputs[0]) if ep.example_inputs else None
        dynamic = exported_dynamic_shapes(ep)
    else:
        from bnfuse.torch.module import capture

        module = load_pickle(input, trust_pickle)
        args = named_zeros(module, list(inspect.signature(module.forward).parameters), input_shapes)
        gm = capture(module, args)
    before = op_counts(gm)
    candidates = fuse_graph_module(gm)
    result = FuseResult(candidates=candidates, ops_before=before, ops_after=op_counts(gm))

    def write(path: Path) -> None:
        if fmt is Format.PICKLE and not to_onnx and path.suffix.lower() != ".pt2":
            raise OutputError(
                f"{path.name}: a pickled model is written as .pt2 or .onnx, never as a pickle",
                hint="name the output .pt2 or .onnx and pass --input-shape",
            )
        if args is None:
            raise BnfuseError(
                f"{input}: no example inputs to export the fused model with",
                hint="pass --input-shape for each input" if fmt is Format.PICKLE else None,
            )
        if to_onnx:
            program = torch.export.export(gm, args, dynamic_shapes=dynamic or None)
            export_onnx_program(program, path)
        else:
            torch.export.save(
                torch.export.export(gm, args, dynamic_shapes=dynamic or None), str(path)
            )

    return result, write
