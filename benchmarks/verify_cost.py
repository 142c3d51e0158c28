"""What verification costs, against one inference of the same model.

    python benchmarks/verify_cost.py                      # generated chains, 4 sizes
    python benchmarks/verify_cost.py model.onnx --runs 5  # and your own models

For each model: fuse it (no verification), then time, each in a fresh process
after its imports, alternating, median of ``--runs``:

- one inference: an onnxruntime session on the CPU with its default options
  (what a deployment would create), and one run on one input;
- verification: ``bnfuse.verify.compare.verify_models(original, fused)`` on the
  CPU with one sample: both models run and compared, and the noise floor.

Both include reading the model files (page cache warm: each was read before).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import sized_chain

ONE_INFERENCE = """
import sys, time, numpy as np, onnxruntime as ort
from bnfuse.verify import inputs
from bnfuse.verify.sources import open_source
src = open_source(__import__("pathlib").Path(sys.argv[1]))
feed = inputs.generate(src.specs, inputs.concrete_shapes(src.specs, {}), 0, 1)[0]
opts = ort.SessionOptions(); opts.log_severity_level = 3
start = time.perf_counter()
session = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
session.run(None, feed)
print(time.perf_counter() - start)
"""

VERIFICATION = """
import sys, time
from pathlib import Path
from bnfuse.verify.compare import verify_models
from bnfuse.verify.options import VerifyOptions
import numpy.random, onnxruntime  # imports, as the one-inference process has made its own
start = time.perf_counter()
result = verify_models(Path(sys.argv[1]), Path(sys.argv[2]), VerifyOptions(device="cpu"))
assert result.passed, result
print(time.perf_counter() - start)
"""


def seconds(code: str, *args: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--sizes", nargs="*", type=int, default=[12, 50, 100, 200])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import bnfuse

    rows = [
        "| model | size | one inference s | verification s | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = list(args.models)
        models += [sized_chain(mb, folder) for mb in args.sizes]
        for model in models:
            fused = folder / f"fused_{model.name}"
            bnfuse.fuse(model, fused, force=True)
            infer, verify = [], []
            for _ in range(args.runs):
                infer.append(seconds(ONE_INFERENCE, str(model)))
                verify.append(seconds(VERIFICATION, str(model), str(fused)))
            i, v = statistics.median(infer), statistics.median(verify)
            size = model.stat().st_size / 2**20
            rows.append(f"| {model.name} | {size:.0f} MB | {i:.3f} | {v:.3f} | {v / i:.2f} |")
            print(rows[-1], file=sys.stderr)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
