"""The outcome in one line, for ``--quiet`` and CI logs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bnfuse.errors import printable
from bnfuse.report.fmt import num
from bnfuse.result import Comparison, FuseResult, VerifyResult

if TYPE_CHECKING:
    from bnfuse.batch import BatchResult


def _worst(v: VerifyResult) -> Comparison | None:
    """The failing output with the largest error; else the output with the largest error."""
    pool = v.failures or v.outputs
    return max(pool, key=lambda c: c.max_abs, default=None)


def _output(c: Comparison) -> str:
    floor = f", noise floor {num(c.floor_max_abs)}" if c.floor_max_abs is not None else ""
    beyond = f", {c.failed}/{c.total} beyond tolerance" if c.failed else ""
    if c.failed and c.passed:
        beyond += " but within the noise floor"
    return f"worst output '{c.name}' on {c.device}: max abs {num(c.max_abs)}{beyond}{floor}"


def one_line(fusion: FuseResult | None, verification: VerifyResult | None) -> str:
    """``PASS: f.onnx against m.onnx (2 folded, 0 skipped; worst output 'y' ...)``."""
    folded = ""
    if fusion is not None:
        verb = "would fold" if fusion.dry_run else "folded"
        folded = f"{len(fusion.folded)} {verb}, {len(fusion.skipped)} skipped"
    if verification is None:
        assert fusion is not None
        where = f"wrote {fusion.outputs[0]}" if fusion.outputs else f"{fusion.input}"
        line = f"{where}: {folded} (not verified)" if not fusion.dry_run else f"{where}: {folded}"
        return printable(line)
    v = verification
    worst = _worst(v)
    parts = [p for p in (folded, _output(worst) if worst is not None else "") if p]
    verdict = "PASS" if v.passed else "FAIL"
    return printable(f"{verdict}: {v.candidate} against {v.original} ({'; '.join(parts)})")


def batch_line(result: BatchResult) -> str:
    """``FAIL: 1 of 3 models failed verification, 1 error; worst: zoo/a.onnx``."""
    n = len(result.outcomes)
    failed = [o for o in result.outcomes if o.exit_code == 1]
    errors = [o for o in result.outcomes if o.exit_code == 2]
    if not failed and not errors:
        verified = sum(o.verification is not None for o in result.outcomes)
        return f"PASS: {n} model(s), {verified} verified"
    parts = []
    if failed:
        parts.append(f"{len(failed)} of {n} failed verification")
    if errors:
        parts.append(f"{len(errors)} of {n} could not be fused or verified")
    first = (failed or errors)[0].input
    return printable(f"{'FAIL' if failed else 'ERROR'}: {', '.join(parts)} (first: {first})")
