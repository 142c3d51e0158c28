"""Run the original and the candidate on the same inputs and compare every output.

Per device (CPU always; CUDA where onnxruntime has it), each output of the
candidate is compared with the original's (metrics.compare). Beside it, the
noise floor: how much the original itself moves under changes that should not
matter, namely onnxruntime's own graph optimisations on vs off on the CPU,
and the CPU vs the GPU where both run. A fusion error at or below the floor
changed nothing that matters.

With ``per_layer``, every tensor that a BatchNorm produced in the original and
a folded layer produces in the candidate (bnfuse keeps the BN's output name)
is exposed as an extra output and compared too, which names the worst layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx

from bnfuse.errors import BnfuseError, InputError
from bnfuse.result import Comparison, VerifyResult
from bnfuse.verify import budget
from bnfuse.verify import inputs as inputs_mod
from bnfuse.verify.inputs import InputSpec
from bnfuse.verify.metrics import compare, stack
from bnfuse.verify.options import Step, VerifyOptions
from bnfuse.verify.precision import lower, onnx_compute_dtypes, torch_compute_dtype
from bnfuse.verify.runners import CPU, CUDA, NoKernel, Runner, onnx_devices, pick_devices
from bnfuse.verify.sources import Source, open_source

# Protobuf cannot hold 2 GiB; a model with extra outputs is passed to onnxruntime as bytes.
_INLINE_LIMIT = 2**31 - 2**26


def resolve_feeds(
    source: Source, opts: VerifyOptions, *, budgeted: bool = False
) -> tuple[list[dict[str, np.ndarray]], str]:
    """The input samples for ``source``: the user's file, or generated ones; unless
    ``budgeted`` (preflight did it), first checked to fit bnfuse.verify.budget."""
    if opts.samples < 1:
        raise BnfuseError("--samples must be at least 1")
    if opts.inputs is not None:
        given = inputs_mod.load_npz(opts.inputs, source.specs)
        if not budgeted:
            shapes = {name: tuple(a.shape) for name, a in given[0].items()}
            budget.check(source.specs, shapes, len(given), source.proto, opts.max_bytes)
        return given, f"file {opts.inputs}"
    shapes = inputs_mod.concrete_shapes(source.specs, opts.input_shapes)
    if not budgeted:
        budget.check(source.specs, shapes, opts.samples, source.proto, opts.max_bytes)
    return inputs_mod.generate(source.specs, shapes, opts.seed, opts.samples), "generated"


def preflight(original: Path, opts: VerifyOptions, source: Source | None = None) -> Source:
    """Fail early, before anything is written, if the inputs or devices cannot be had, or
    the verification would hold more memory than bnfuse allows.

    Returns the opened original (``source``, where the caller has read it already), for
    ``verify_models`` to use rather than load it again.
    """
    if source is None:
        source = open_source(original, opts.trust_pickle)
    if opts.inputs is None:
        shapes = inputs_mod.concrete_shapes(source.specs, opts.input_shapes)
        budget.check(source.specs, shapes, opts.samples, source.proto, opts.max_bytes)
    resolve_feeds(
        source, VerifyOptions(**{**opts.__dict__, "samples": 1}), budgeted=opts.inputs is None
    )
    pick_devices(opts.device, available_devices(source))
    return source


def verify_models(
    original: Path,
    candidate: Path,
    options: VerifyOptions | None = None,
    on_step: Step | None = None,
    *,
    opened: Source | None = None,
) -> VerifyResult:
    """Compare ``candidate`` with ``original`` (ONNX, TorchScript or .pt2, in any pairing).

    ``opened``: the original as ``preflight`` opened it, if it did.
    """
    opts = options or VerifyOptions()
    report_step = on_step or (lambda _msg, _done, _total: None)
    a = opened if opened is not None else open_source(original, opts.trust_pickle)
    b = open_source(candidate, opts.trust_pickle)
    _check_interfaces(a, b, original, candidate)
    feeds, source = resolve_feeds(a, opts, budgeted=opened is not None)
    devices, notes = pick_devices(opts.device, available_devices(a, b))
    layer_names = _layer_tensors(a, b, notes) if opts.per_layer else []
    models = _Models(original, candidate, layer_names)
    floor_label, floor_runner = _noise_floor_run(a)
    runs, devices, runtime = _execute(
        a, b, models, devices, floor_runner, feeds, report_step, notes
    )

    first = runs[("original", devices[0])][0]
    a_names = a.outputs or list(first)
    pairs = _pair_outputs(
        a_names, list(runs[("candidate", devices[0])][0]), a.is_onnx and b.is_onnx
    )

    def gathered(role: str, device: str, name: str) -> np.ndarray:
        return stack([r[name] for r in runs[(role, device)]])

    precision = _compute_dtypes(a, b, pairs)
    lowest = functools.reduce(lower, precision.values(), "")

    def fusion_error(name: str, device: str, dtype: str) -> Comparison:
        return compare(
            name,
            device,
            gathered("original", device, name),
            gathered("candidate", device, pairs.get(name, name)),
            opts.atol,
            opts.rtol,
            class_scores=first[name].ndim == 2,  # [N, C] per sample: class scores
            compute_dtype=dtype,
        )

    outputs = [
        fusion_error(name, device, precision.get(name, ""))
        for device in devices
        for name in a_names
    ]
    layers = [fusion_error(name, CPU, lowest) for name in layer_names]
    floor: list[Comparison] = []
    if ("floor", CPU) in runs:
        for name in a_names:
            ref = gathered("original", CPU, name)
            scores = first[name].ndim == 2
            floor_out = gathered("floor", CPU, name).astype(ref.dtype)
            floor.append(compare(name, floor_label, ref, floor_out, class_scores=scores))
            if CUDA in devices:
                cuda_out = gathered("original", CUDA, name)
                floor.append(compare(name, "cpu vs cuda", ref, cuda_out, class_scores=scores))
    return VerifyResult(
        original=original,
        candidate=candidate,
        devices=devices,
        outputs=[_with_floor(c, floor) for c in outputs],
        noise_floor=floor,
        layers=layers,
        notes=notes,
        seed=opts.seed,
        samples=len(feeds),
        input_source=source,
        runtime=runtime,
    )


def _check_interfaces(a: Source, b: Source, original: Path, candidate: Path) -> None:
    """The candidate takes the original's inputs and (ONNX) gives its outputs."""
    if [s.name for s in a.specs] != [s.name for s in b.specs]:
        raise InputError(
            f"{candidate} does not have the inputs of {original} "
            f"({[s.name for s in b.specs]} vs {[s.name for s in a.specs]})"
        )
    for mine, theirs in zip(b.specs, a.specs, strict=True):
        differs = _input_difference(theirs, mine, both_onnx=a.is_onnx and b.is_onnx)
        if differs is not None:
            there, here = differs
            raise InputError(
                f"{candidate} does not take the inputs of {original}: input '{mine.name}' is "
                f"{there} in {candidate.name} and {here} in {original.name}"
            )
    if a.is_onnx and b.is_onnx and a.outputs != b.outputs:
        raise InputError(
            f"{candidate} does not have the outputs of {original} ({b.outputs} vs {a.outputs})"
        )


def _input_difference(
    original: InputSpec, candidate: InputSpec, both_onnx: bool
) -> tuple[str, str] | None:
    """How one input differs between the models (rank; for two ONNX models, also element
    type and fixed dimensions): what it is in the candidate and in the original; None
    where they may take the same tensor."""

    def shown(spec: InputSpec) -> str:
        assert spec.shape is not None
        dims = ", ".join("?" if d is None else str(d) for d in spec.shape)
        return f"[{dims}] ({len(spec.shape)}-D)"

    if original.shape is not None and candidate.shape is not None:
        fixed = [
            (x, y) for x, y in zip(original.shape, candidate.shape, strict=False)
            if isinstance(x, int) and isinstance(y, int)
        ]  # fmt: skip
        if len(original.shape) != len(candidate.shape) or (
            both_onnx and any(x != y for x, y in fixed)
        ):
            return shown(candidate), shown(original)
    if both_onnx and original.dtype != candidate.dtype:
        return str(candidate.dtype), str(original.dtype)
    return None


def _layer_tensors(a: Source, b: Source, notes: list[str]) -> list[str]:
    """The tensors --per-layer compares: BatchNorm outputs now made by a folded layer."""
    if a.proto is None or b.proto is None:
        notes.append("per-layer: compared for ONNX models only")
        return []
    names = _folded_tensors(a.proto, b.proto)
    if not names:
        notes.append(
            "per-layer: no tensor is a BatchNorm output in the original and a layer "
            "output in the candidate"
        )
    return names


@dataclass
class _Models:
    """The two models as the runners take them: with the per-layer tensors as outputs."""

    original: Path
    candidate: Path
    layer_names: list[str]
    a: Path | bytes | None = None  # None: the file as it is
    b: Path | bytes | None = None

    def __post_init__(self) -> None:
        if self.layer_names:
            self.a = _with_outputs(self.original, self.layer_names)
            self.b = _with_outputs(self.candidate, self.layer_names)


def _execute(
    a: Source,
    b: Source,
    models: _Models,
    devices: list[str],
    floor_runner: Callable[[], Runner],
    feeds: list[dict[str, np.ndarray]],
    report_step: Step,
    notes: list[str],
) -> tuple[Runs, list[str], str]:
    """Every run (original, candidate, noise floor): the runs, the devices, the runtime.

    Where onnxruntime has no kernel for the models, they run with onnx's reference
    evaluator on the CPU instead (a real runtime still, in the models' own types).
    """
    jobs: list[tuple[str, str, Callable[[], Runner]]] = [
        (role, device, partial(src.runner, device, model=model))
        for device in devices
        for role, src, model in (("original", a, models.a), ("candidate", b, models.b))
    ]
    jobs.append(("floor", CPU, floor_runner))
    try:
        return _run_jobs(jobs, feeds, report_step), devices, "onnxruntime" if a.is_onnx else "torch"
    except NoKernel as exc:
        if not (a.is_onnx and b.is_onnx):
            raise
        from bnfuse.verify import reference  # onnx's evaluator: imported only when needed

        notes.append(
            f"onnxruntime cannot run these models ({exc.reason}); they were run with "
            f"{reference.LABEL} on the CPU, and no noise floor was measured"
        )
    jobs = [
        ("original", CPU, partial(_reference_runner, models.original, models.a)),
        ("candidate", CPU, partial(_reference_runner, models.candidate, models.b)),
    ]
    return _run_jobs(jobs, feeds, report_step), [CPU], reference.LABEL


Runs = dict[tuple[str, str], list[dict[str, np.ndarray]]]


def _run_jobs(
    jobs: list[tuple[str, str, Callable[[], Runner]]],
    feeds: list[dict[str, np.ndarray]],
    report_step: Step,
) -> Runs:
    """Each (role, device, runner) on every sample; one runner alive at a time."""
    total = len(jobs) * len(feeds)
    runs: Runs = {}
    done = 0
    for role, device, make in jobs:
        runner = make()
        results = runs.setdefault((role, device), [])
        for sample in feeds:
            report_step(f"{role} on {runner.label}", done, total)
            results.append(runner.infer(sample))
            done += 1
        del runner  # one session (a copy of the model's weights) alive at a time
    report_step("comparing", done, total)
    return runs


def _reference_runner(path: Path, with_outputs: Path | bytes | None) -> Runner:
    model = (
        onnx.load_from_string(with_outputs)
        if isinstance(with_outputs, bytes)
        else onnx.load(str(path))
    )
    from bnfuse.verify import reference

    return reference.ReferenceRunner(model, path.name)


def _compute_dtypes(a: Source, b: Source, pairs: dict[str, str]) -> dict[str, str]:
    """Per output of ``a``: the lower of the two models' compute precisions ('' unknown)."""

    def of(source: Source) -> dict[str, str] | str:
        if source.proto is not None:
            return onnx_compute_dtypes(source.proto)
        if source._torch_model is not None:
            return torch_compute_dtype(source._torch_model)
        return ""

    da, db = of(a), of(b)
    out = {}
    for name, other in pairs.items():
        first = da.get(name, "") if isinstance(da, dict) else da
        second = db.get(other, "") if isinstance(db, dict) else db
        out[name] = lower(first, second)
    return out


def _with_floor(c: Comparison, floors: list[Comparison]) -> Comparison:
    """``c`` with the noise floor it is weighed against: the largest measured for its output
    on its device (the CPU floor for CPU; every floor, CPU vs CUDA included, for CUDA)."""
    measured = [
        f.max_abs
        for f in floors
        if f.name == c.name and (c.device != CPU or f.device.startswith(CPU))
        and f.nonfinite_mismatch == 0
    ]  # fmt: skip
    return replace(c, floor_max_abs=max(measured)) if measured else c


def available_devices(*sources: Source) -> dict[str, str | None]:
    """Devices every model can run on, and why not where one cannot."""
    devices: dict[str, str | None] = (
        onnx_devices() if any(s.is_onnx for s in sources) else {CPU: None, CUDA: None}
    )
    if any(not s.is_onnx for s in sources) and devices.get(CUDA) is None:
        import torch

        if not torch.cuda.is_available():
            devices[CUDA] = "torch sees no CUDA device"
    return devices


def _noise_floor_run(a: Source) -> tuple[str, Callable[[], Runner]]:
    """What the original itself moves by, on the CPU, under a change that should not matter.

    ONNX: onnxruntime's own graph optimisations on vs off. torch: float32 vs float64.
    """
    if a.is_onnx:
        return "cpu: onnxruntime optimised vs not", lambda: a.runner(CPU, optimize=True)
    import torch

    return "cpu: float32 vs float64", lambda: a.torch_runner(CPU, torch.float64)


def _pair_outputs(a: list[str], b: list[str], by_name: bool) -> dict[str, str]:
    """The candidate's output for each of the original's: by name, else by position."""
    if by_name or a == b:
        return {n: n for n in a}
    if len(a) != len(b):
        raise InputError(f"the models have {len(a)} and {len(b)} outputs")
    return dict(zip(a, b, strict=True))


def _folded_tensors(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    """Tensors a BatchNorm made in ``a`` that another op makes in ``b`` (main graph)."""
    outputs = {o.name for o in a.graph.output}
    b_producer = {out: node.op_type for node in b.graph.node for out in node.output}
    names = []
    for node in a.graph.node:
        if node.op_type != "BatchNormalization" or not node.output:
            continue
        name = node.output[0]
        if (
            name not in outputs
            and b_producer.get(name, "BatchNormalization") != "BatchNormalization"
        ):
            names.append(name)
    return names


def _with_outputs(path: Path, names: list[str]) -> bytes:
    """The model as bytes, with ``names`` added as graph outputs."""
    model = onnx.load(str(path))
    if model.ByteSize() > _INLINE_LIMIT:
        raise BnfuseError(
            f"{path}: too large for --per-layer (over 2 GB once loaded)",
            hint="run without --per-layer",
        )
    types = _elem_types(model)
    known = {v.name: v for v in model.graph.value_info}
    for name in names:
        info = known.get(name)
        if info is None or not info.type.tensor_type.elem_type:
            info = onnx.helper.make_tensor_value_info(name, types.get(name, 0), None)
        model.graph.output.append(info)
    return bytes(model.SerializeToString())


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every main-graph tensor, as far as it follows from the graph.

    A BatchNorm's (or a Conv's) output has the type of its first input; a Cast's is
    its ``to``. Enough for the tensors --per-layer exposes, which are never the graph
    output's type by assumption (an fp16 network that casts to float32 at the end).
    """
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.value_info})
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        source = to if node.op_type == "Cast" and to else types.get(next(iter(node.input), ""), 0)
        for out in node.output:
            types.setdefault(out, source)
    return types
