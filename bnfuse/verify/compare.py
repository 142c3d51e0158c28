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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bnfuse.errors import BnfuseError, InputError
from bnfuse.result import Comparison, VerifyResult
from bnfuse.verify import inputs as inputs_mod
from bnfuse.verify.metrics import compare, stack
from bnfuse.verify.runners import CPU, CUDA, OnnxRuntimeRunner, onnx_devices, pick_devices

# Protobuf cannot hold 2 GiB; a model with extra outputs is passed to onnxruntime as bytes.
_INLINE_LIMIT = 2**31 - 2**26


@dataclass
class VerifyOptions:
    device: str = "all"
    seed: int = 0
    samples: int = 1
    atol: float | None = None
    rtol: float | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    inputs: Path | None = None
    per_layer: bool = False


Step = Callable[[str, int, int], None]  # (what runs now, steps done, steps in all)


def verify_onnx(
    original: Path,
    candidate: Path,
    options: VerifyOptions | None = None,
    on_step: Step | None = None,
) -> VerifyResult:
    opts = options or VerifyOptions()
    report_step = on_step or (lambda _msg, _done, _total: None)
    if opts.samples < 1:
        raise BnfuseError("--samples must be at least 1")
    a_proto = _load_graph(original)
    b_proto = _load_graph(candidate)
    specs = inputs_mod.onnx_input_specs(a_proto)
    _check_same_interface(a_proto, b_proto, original, candidate)
    if opts.inputs is not None:
        feeds = inputs_mod.load_npz(opts.inputs, specs)
        source = f"file {opts.inputs}"
    else:
        shapes = inputs_mod.concrete_shapes(specs, opts.input_shapes)
        feeds = inputs_mod.generate(specs, shapes, opts.seed, opts.samples)
        source = "generated"
    devices, notes = pick_devices(opts.device, onnx_devices())

    layer_names = _folded_tensors(a_proto, b_proto) if opts.per_layer else []
    if opts.per_layer and not layer_names:
        notes.append(
            "per-layer: no tensor is a BatchNorm output in the original and a layer output in the candidate"
        )
    a_model: Path | bytes = original
    b_model: Path | bytes = candidate
    if layer_names:
        a_model = _with_outputs(original, layer_names)
        b_model = _with_outputs(candidate, layer_names)
    output_names = [o.name for o in a_proto.graph.output]

    jobs: list[tuple[str, str, Path | bytes, bool]] = [
        (role, device, model, False)
        for device in devices
        for role, model in (("original", a_model), ("candidate", b_model))
    ]
    jobs.append(("optimised", CPU, original, True))  # the noise floor's run
    total = len(jobs) * len(feeds)
    runs: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {}
    done = 0
    for role, device, model, optimize in jobs:
        runner = OnnxRuntimeRunner(model, device, optimize=optimize)
        results = runs.setdefault((role, device), [])
        for sample in feeds:
            report_step(f"{role} on {runner.label}", done, total)
            results.append(runner.infer(sample))
            done += 1
    report_step("comparing", done, total)

    def gathered(role: str, device: str, name: str) -> np.ndarray:
        return stack([r[name] for r in runs[(role, device)]])

    first = runs[("original", devices[0])][0]

    def fusion_error(name: str, device: str) -> Comparison:
        return compare(
            name,
            device,
            gathered("original", device, name),
            gathered("candidate", device, name),
            opts.atol,
            opts.rtol,
            class_scores=first[name].ndim == 2,  # [N, C] per sample: class scores
        )

    outputs = [fusion_error(name, device) for device in devices for name in output_names]
    layers = [fusion_error(name, CPU) for name in layer_names]
    floor: list[Comparison] = []
    for name in output_names:
        ref = gathered("original", CPU, name)
        floor.append(
            compare(
                name, "cpu: onnxruntime optimised vs not", ref, gathered("optimised", CPU, name)
            )
        )
        if CUDA in devices:
            floor.append(compare(name, "cpu vs cuda", ref, gathered("original", CUDA, name)))
    return VerifyResult(
        original=original,
        candidate=candidate,
        devices=devices,
        outputs=outputs,
        noise_floor=floor,
        layers=layers,
        notes=notes,
        seed=opts.seed,
        samples=len(feeds),
        input_source=source,
    )


def _load_graph(path: Path) -> onnx.ModelProto:
    """The graph without its weights (external data stays on disk)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc


def _check_same_interface(
    a: onnx.ModelProto, b: onnx.ModelProto, a_path: Path, b_path: Path
) -> None:
    def interface(m: onnx.ModelProto) -> tuple[list[str], list[str]]:
        inits = {t.name for t in m.graph.initializer}
        return (
            [i.name for i in m.graph.input if i.name not in inits],
            [o.name for o in m.graph.output],
        )

    (a_in, a_out), (b_in, b_out) = interface(a), interface(b)
    if a_in != b_in or a_out != b_out:
        raise InputError(
            f"{b_path} does not have the inputs and outputs of {a_path} "
            f"(inputs {b_in} vs {a_in}; outputs {b_out} vs {a_out})"
        )


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
    elem = model.graph.output[0].type.tensor_type.elem_type
    known = {v.name: v for v in model.graph.value_info}
    for name in names:
        info = known.get(name) or onnx.helper.make_tensor_value_info(name, elem, None)
        model.graph.output.append(info)
    return bytes(model.SerializeToString())
