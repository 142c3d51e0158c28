"""Two models compared must take the same inputs: a difference is said up front, naming the
input and how it differs, not left to onnxruntime ("Invalid rank for input")."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnfuse.errors import InputError
from bnfuse.verify.compare import verify_models

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


@pytest.mark.parametrize(
    ("candidate", "words"),
    [
        ("conv3d_bn.onnx", "input 'x' is [2, 4, 7, 6, 5] (5-D) in conv3d_bn.onnx and "
         "[2, 4, 7, 6] (4-D) in conv2d_bn.onnx"),
        ("conv_bn_fp16.onnx", "input 'x' is float16 in conv_bn_fp16.onnx and float32 in "
         "conv2d_bn.onnx"),
    ],
    ids=["rank", "element_type"],
)  # fmt: skip
def test_inputs_that_differ_are_named_before_anything_runs(candidate: str, words: str) -> None:
    with pytest.raises(InputError) as raised:
        verify_models(SAMPLES / "conv2d_bn.onnx", SAMPLES / candidate)
    assert "does not take the inputs of" in str(raised.value) and words in str(raised.value)


def test_verify_and_fuse_word_a_malformed_file_alike(tmp_path: Path) -> None:
    """The verifier said "DecodeError: ... Wire format was corrupt" where the fuse names the
    fault ("malformed protobuf: ..."): it now reads the file as the fuse does."""
    import bnfuse

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07\x3a\x05ab")
    with pytest.raises(InputError) as verifying:
        verify_models(bad, bad)
    with pytest.raises(InputError) as fusing:
        bnfuse.fuse(bad, dry_run=True)
    assert "malformed protobuf: a field runs past the end of its message" in str(verifying.value)
    assert str(verifying.value) == str(fusing.value)


def test_models_with_the_same_inputs_are_compared() -> None:
    result = verify_models(SAMPLES / "conv2d_bn.onnx", SAMPLES / "conv2d_bn.onnx")
    assert result.passed
