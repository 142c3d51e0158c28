"""The library entry points; the CLI is a thin layer over these."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from bnfuse import outputs
from bnfuse.errors import BnfuseError, OutputError, python_hint
from bnfuse.formats import TORCH_FORMATS, TORCH_SUFFIXES, detect, require_torch
from bnfuse.result import Candidate, FuseResult

if TYPE_CHECKING:
    from torch import nn

    from bnfuse.onnx.graph import Model
    from bnfuse.onnx.io import LoadedModel
    from bnfuse.result import VerifyResult
    from bnfuse.verify.options import Step, VerifyOptions


@overload
def fuse(
    input: str | Path,
    output: str | Path | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    trust_pickle: bool = False,
) -> FuseResult: ...


@overload
def fuse(
    input: nn.Module, *, example_inputs: Sequence[Any] | None = None, inplace: bool = False
) -> nn.Module: ...


def fuse(
    input: Any,
    output: str | Path | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    trust_pickle: bool = False,
    example_inputs: Sequence[Any] | None = None,
    inplace: bool = False,
) -> Any:
    """Fold BatchNorms: an ONNX file (returns a FuseResult), or an nn.Module.

    For an ``nn.Module`` the original is left untouched and a fused
    ``torch.fx.GraphModule`` is returned; with ``inplace=True`` the module
    itself is folded and returned (same object, class and methods; each folded
    BatchNorm becomes ``nn.Identity``). ``bnfuse.torch.module.fuse_module``
    returns the report too.
    """
    if not isinstance(input, (str, Path)):
        from bnfuse.torch.module import fuse_module

        return fuse_module(input, example_inputs, inplace=inplace).module
    try:
        return fuse_file(input, output, force=force, dry_run=dry_run, trust_pickle=trust_pickle)
    except BnfuseError as exc:
        exc.hint = python_hint(exc.hint)  # a caller of fuse() passes arguments, not flags
        raise


def fuse_file(
    input: str | Path,
    output: str | Path | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    trust_pickle: bool = False,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    also_writes: Sequence[tuple[str, Path]] = (),
    also_reads: Sequence[tuple[str, Path]] = (),
    loaded: LoadedModel | None = None,
) -> FuseResult:
    """Fuse a model file: ONNX, TorchScript (.pt) or ExportedProgram (.pt2).

    The format comes from the file's content. A PyTorch input may be written
    as ``.onnx`` (fused, then exported) or in its own format. ``also_writes``
    (the caller's reports) and ``also_reads`` (its input data) are checked
    with the output under one set of rules (bnfuse.outputs) before anything
    is written. ``loaded``: the ONNX model at ``input``, read already (by
    ``fuse_and_verify``, which reads it once for the fuse and the verifier).
    """
    path = Path(input)
    out = Path(output) if output is not None else None
    fmt = detect(path)
    if fmt in TORCH_FORMATS:
        require_torch(path, fmt)
        from bnfuse.torch.files import fuse_torch_file

        return fuse_torch_file(
            path,
            out,
            fmt,
            force=force,
            dry_run=dry_run,
            trust_pickle=trust_pickle,
            input_shapes=input_shapes,
            also_writes=also_writes,
            also_reads=also_reads,
        )
    if out is not None and out.suffix.lower() in TORCH_SUFFIXES:
        raise OutputError(
            f"{out}: bnfuse writes an ONNX input as ONNX", hint="name the output .onnx"
        )
    return fuse_onnx(
        path, out, force=force, dry_run=dry_run, also_writes=also_writes, also_reads=also_reads,
        loaded=loaded,
    )  # fmt: skip


@outputs.replacing()
def fuse_and_verify(
    input: Path,
    output: Path | None,
    *,
    verify: VerifyOptions | None,
    force: bool = False,
    dry_run: bool = False,
    trust_pickle: bool = False,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    also_writes: Sequence[tuple[str, Path]] = (),
    also_reads: Sequence[tuple[str, Path]] = (),
    on_fused: Callable[[FuseResult], None] | None = None,
    on_step: Step | None = None,
) -> tuple[FuseResult, VerifyResult | None]:
    """Preflight, fuse, write, verify: what ``bnfuse IN -o OUT`` and batch mode do per model.

    The preflight opens the original and resolves its inputs and devices
    before anything is written, so that a verification that cannot run fails
    first. If verification fails to run, or the run is interrupted (Ctrl-C,
    SIGTERM), the output just written is removed: no unverified output is
    left, and a file it replaced (``force``) is put back. A verification that
    runs and finds a difference is a result, not an error: the output stays,
    and the VerifyResult says FAIL. ``on_fused`` is told the fusion result as
    soon as there is one.
    """
    checking = verify is not None and not dry_run and output is not None
    opened, loaded = None, None
    if checking:
        from bnfuse.verify.compare import preflight

        assert verify is not None
        source = None
        if detect(Path(input)) not in TORCH_FORMATS:  # read once, for the fuse and the verifier
            from bnfuse.onnx import io
            from bnfuse.verify.sources import onnx_source

            loaded = io.load(Path(input))
            source = onnx_source(Path(input), io.graph_only(loaded.model.proto))
        opened = preflight(input, verify, source)
    result = fuse_file(
        input, output, force=force, dry_run=dry_run, trust_pickle=trust_pickle,
        input_shapes=input_shapes, also_writes=also_writes, also_reads=also_reads, loaded=loaded,
    )  # fmt: skip
    if on_fused is not None:
        on_fused(result)
    if not checking or result.dry_run:
        return result, None
    from bnfuse.verify.compare import verify_models

    assert verify is not None and output is not None
    try:
        return result, verify_models(input, output, verify, on_step, opened=opened)
    except BaseException:
        outputs.remove(result.outputs)
        result.outputs = []
        raise


MAX_ROUNDS = 16


def fold_all(model: Model) -> list[Candidate]:
    """Match and fold until nothing more folds; every candidate reported once.

    Folding can make more folds possible (Conv -> BN -> Mul: once the BN is
    gone the Mul follows the Conv directly), so matching repeats. In one round
    each layer takes at most one fold, since plans are computed from the
    weights as they were when matched.
    """
    from bnfuse.onnx import match
    from bnfuse.onnx.rewrite import FoldBatchNorms

    folded: list[Candidate] = []
    for _ in range(MAX_ROUNDS):
        matches = match.find(model)
        plans, seen = [], set()
        for m in matches:
            if m.plan is not None and id(m.plan.site.layer) not in seen:
                seen.add(id(m.plan.site.layer))
                plans.append(m)
        if not plans:
            break
        FoldBatchNorms(model).apply(m.plan for m in plans if m.plan is not None)
        folded += [m.candidate for m in plans]
    else:
        matches = match.find(model)
    return folded + [m.candidate for m in matches if m.plan is None]


def fuse_onnx(
    input: str | Path,
    output: str | Path | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    also_writes: Sequence[tuple[str, Path]] = (),
    also_reads: Sequence[tuple[str, Path]] = (),
    loaded: LoadedModel | None = None,
) -> FuseResult:
    """Fold every legal BatchNorm of the ONNX model at ``input`` into its layer.

    Writes ``output`` (atomically; external data beside it when the input had
    it or the model passes 2 GB) unless ``dry_run`` or ``output`` is None.
    Every BN is reported, folded or skipped with its reason.

    >>> result = bnfuse.fuse("model.onnx", "fused.onnx")  # doctest: +SKIP
    >>> len(result.folded), len(result.skipped)  # doctest: +SKIP
    """
    from bnfuse.onnx import io
    from bnfuse.onnx.rewrite import op_counts

    out = Path(output) if output is not None else None

    source = loaded if loaded is not None else io.load(Path(input))
    if out is not None and not dry_run:
        targets = [*io.output_targets(source, out), *also_writes]
        outputs.check_targets(targets, [*io.files_read(source), *also_reads], force=force)
    elif also_writes:
        outputs.check_targets(also_writes, [*io.files_read(source), *also_reads], force=force)
    before = op_counts(source.model)
    candidates = fold_all(source.model)
    result = FuseResult(
        candidates=candidates,
        ops_before=before,
        ops_after=op_counts(source.model),
        input=source.path,
        dry_run=dry_run or out is None,
    )
    if result.dry_run:
        return result
    assert out is not None
    result.outputs = io.save(
        source.model, out, external_data=io.needs_external_data(source), force=force
    )
    return result
