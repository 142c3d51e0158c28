"""The command line contract: exit codes, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from bnfuse.cli import main
from sample_models.models import layer_bn, with_extra_output

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 0), out, err


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """Two BNs: one folds, one is skipped because the conv output is also a graph output."""
    model = with_extra_output(layer_bn("Conv"), None, "h")
    extra = layer_bn("Gemm", trans_b=1)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    onnx.save(extra, tmp_path / "gemm.onnx")
    return path


def test_fuse_prints_summary_and_exits_0(
    model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = model_path.with_name("fused.onnx")
    code, out, err = run_cli([str(model_path), "-o", str(out_path)], capsys)
    assert code == 0, err
    assert "1 BatchNormalization found, 1 folded" not in out  # it is skipped here
    assert "1 BatchNormalization found, 0 folded, 1 skipped" in out
    assert "the layer's output is a graph output" in out
    assert out_path.exists()


def test_fuse_summary_counts_ops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    code, out, _ = run_cli(["fuse", str(src), "-o", str(tmp_path / "f.onnx")], capsys)
    assert code == 0
    assert "1 BatchNormalization found, 1 folded, 0 skipped" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") == 4}
    assert rows["BatchNormalization"].split("│")[2:4] == ["      1 ", "     0 "]
    assert "total" in rows


def test_dry_run_writes_nothing(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli([str(model_path.with_name("gemm.onnx")), "--dry-run"], capsys)
    assert code == 0
    assert "1 would fold" in out and "Gemm 'layer'" in out
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["gemm.onnx", "model.onnx"]


@pytest.mark.parametrize(
    ("case", "content"),
    [
        ("missing", None),
        ("empty", b""),
        ("random_bytes", bytes(range(256)) * 7),
        ("json", json.dumps({"graph": {"node": []}}).encode()),
        ("text", b"this is not a model\n"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    case: str, content: bytes | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / f"{case}.onnx"
    if content is not None:
        src.write_bytes(content)
    out_path = tmp_path / "out.onnx"
    code, out, err = run_cli([str(src), "-o", str(out_path)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("bnfuse: error: ") and str(src) in err
    assert "Traceback" not in err + out
    assert not out_path.exists()


def test_folder_as_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli([str(tmp_path), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "a folder with no .onnx, .pt or .pt2 file" in err


def test_output_equal_to_input_is_refused(
    model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = model_path.read_bytes()
    code, _, err = run_cli([str(model_path), "-o", str(model_path), "--force"], capsys)
    assert code == 2 and "would overwrite the input model" in err
    assert model_path.read_bytes() == before


def test_existing_output_needs_force(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = model_path.with_name("fused.onnx")
    out_path.write_bytes(b"keep me")
    code, _, err = run_cli([str(model_path), "-o", str(out_path)], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert out_path.read_bytes() == b"keep me"
    code, _, _ = run_cli([str(model_path), "-o", str(out_path), "--force"], capsys)
    assert code == 0
    onnx.checker.check_model(str(out_path), full_check=True)


def test_missing_output_option_exits_2(
    model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli([str(model_path)], capsys)
    assert code == 2 and "-o/--output" in err


def test_quiet_prints_one_line(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fused = model_path.with_name("q.onnx")
    code, out, err = run_cli([str(model_path), "-o", str(fused), "-q"], capsys)
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"PASS: {fused} against {model_path} (0 folded, 1 skipped; worst output 'y' on cpu: "
        "max abs 0)"
    ] or (len(out.splitlines()) == 1 and out.startswith(f"PASS: {fused} against {model_path}"))


def test_quiet_failing_verify_prints_its_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing verify -q used to print nothing at all."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(layer_bn("Conv"), a)
    model = layer_bn("Conv")
    for t in model.graph.initializer:
        if t.name == "bn.bias":
            arr = onnx.numpy_helper.to_array(t) + 1
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    onnx.save(model, b)
    code, out, err = run_cli(["verify", str(a), str(b), "-q"], capsys)
    assert code == 1 and err == ""
    (line,) = out.splitlines()
    assert line.startswith(f"FAIL: {b} against {a} (worst output 'y' on cpu: max abs ")
    assert "beyond tolerance" in line


def test_quiet_batch_prints_its_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(layer_bn("Conv"), tmp_path / "a.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"garbage")
    code, out, err = run_cli([str(tmp_path), "-o", str(tmp_path / "out"), "-q"], capsys)
    assert code == 2
    assert out.splitlines() == [
        f"ERROR: 1 of 2 could not be fused or verified (first: {tmp_path / 'broken.onnx'})"
    ]
    assert len(err.splitlines()) == 1 and err.startswith("bnfuse: error: ")


def test_reports_are_written_on_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """So that CI's `if: always()` upload finds them, with the error in them."""
    import xml.etree.ElementTree as ET

    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    reports = [tmp_path / f"r.{s}" for s in ("json", "md", "xml", "html")]
    import numpy as np

    np.savez(tmp_path / "in.npz", not_an_input=np.zeros(3, np.float32))  # refused: exit 2
    args = [str(src), "-o", str(tmp_path / "f.onnx"), "--inputs", str(tmp_path / "in.npz")]
    code, _, _ = run_cli([*args, *(a for r in reports for a in ("--report", str(r)))], capsys)
    assert code == 2
    data = json.loads(reports[0].read_text())
    assert data["passed"] is False and "not inputs of the model" in data["error"]
    assert "ERROR" in reports[1].read_text()
    root = ET.parse(reports[2]).getroot()
    assert root.get("errors") == "1" and root.find(".//error") is not None
    assert "ERROR" in reports[3].read_text()
    assert not (tmp_path / "f.onnx").exists()


def test_python_dash_m_and_help(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bnfuse", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and "bnfuse model.onnx -o fused.onnx" in proc.stdout
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    proc = subprocess.run(
        [sys.executable, "-m", "bnfuse", str(src), "-o", str(tmp_path / "f.onnx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 folded" in proc.stdout


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys; from bnfuse.cli import app; "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'onnx_ir') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("as_command", [True, False], ids=["command", "library"])
def test_the_collector_is_tuned_for_the_command_only(as_command: bool) -> None:
    """The command raises the cyclic collector's thresholds for its own process (a 30,000-node
    graph spent 0.5 s of 3.1 s in it); a program that calls bnfuse keeps its own."""
    call = "sys.argv = ['bnfuse', '--version']; main()" if as_command else "main(['--version'])"
    code = (
        "import gc, sys; from bnfuse.cli import main\n"
        f"try:\n    {call}\nexcept SystemExit:\n    pass\n"
        "print(gc.get_threshold())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    default = subprocess.run(
        [sys.executable, "-c", "import gc; print(gc.get_threshold())"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    got = proc.stdout.strip().splitlines()[-1]
    assert (got == "(100000, 50, 50)") if as_command else (got == default.strip()), got


def test_onnx_fuse_imports_only_what_it_uses(tmp_path: Path) -> None:
    """The start is most of a fuse's time: no torch, onnxruntime, sympy or pydantic behind it,
    no onnx-ir, no onnx package (its generated messages only: bnfuse.onnx.proto) and no
    ml_dtypes either.

    pydantic is behind typer 0.29 (typer is capped below it in pyproject.toml). The work
    runs in this process (BNFUSE_IN_PROCESS), so its imports are the ones counted.
    """
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    code = (
        "import sys; from bnfuse.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'onnxruntime', 'sympy', 'pydantic', 'onnx_ir', 'onnx', 'ml_dtypes')\n"
        "print(sorted(m for m in heavy if type(sys.modules.get(m)).__name__ == 'module'))"
    )
    argv = [str(src), "-o", str(tmp_path / "f.onnx"), "--no-verify", "-q"]
    env = {**os.environ, "BNFUSE_IN_PROCESS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True, env=env
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert (tmp_path / "f.onnx").exists()


def test_fuse_and_verify_open_each_model_once(
    model_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ONNX input is read once, and that one reading serves the fuse, the preflight and
    the verification; the fused model is opened once, to be compared."""
    from bnfuse.onnx import io
    from bnfuse.verify import compare

    opened: list[str] = []
    real_open, real_load = compare.open_source, io.load

    def counting(path: Path, trust_pickle: bool = False) -> compare.Source:
        opened.append(Path(path).name)
        return real_open(path, trust_pickle)

    def loading(path: Path) -> io.LoadedModel:
        opened.append(f"load {Path(path).name}")
        return real_load(path)

    monkeypatch.setattr(compare, "open_source", counting)
    monkeypatch.setattr(io, "load", loading)
    out_path = model_path.with_name("fused.onnx")
    code, _, err = run_cli([str(model_path), "-o", str(out_path), "-q"], capsys)
    assert code == 0, err
    assert sorted(opened) == ["fused.onnx", "load model.onnx"]


def test_odd_value_info_gives_no_warnings_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value_info with a shape but no type is carried as it is, with no warning on stderr."""
    model = onnx.load(str(SAMPLES / "skip_training_mode.onnx"))  # 'h' survives: nothing folds
    for info in model.graph.value_info:
        if info.name == "h":
            info.type.tensor_type.ClearField("elem_type")
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnfuse",
            str(src),
            "-o",
            str(tmp_path / "f.onnx"),
            "-q",
            "--no-verify",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_names_are_printed_whole_when_stdout_is_no_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CI log is no 80-column terminal: node names and paths come out whole."""
    model = layer_bn("Conv")
    long = "_and_a_node_name_that_goes_on_well_beyond_eighty_columns_of_a_terminal"
    for node in model.graph.node:
        node.name += long
    folder = tmp_path / "a_folder_with_a_name_long_enough_to_be_cut_in_a_narrow_table"
    folder.mkdir()
    onnx.save(model, folder / "model_with_a_long_name_as_well.onnx")
    code, out, _ = run_cli(
        [str(folder / "model_with_a_long_name_as_well.onnx"), "--dry-run"], capsys
    )
    assert code == 0 and f"'bn{long}'" in out and f"'layer{long}'" in out
    code, out, _ = run_cli([str(tmp_path), "-o", str(tmp_path / "out"), "--no-verify"], capsys)
    assert code == 0 and str(folder / "model_with_a_long_name_as_well.onnx") in out


def test_version_and_short_help(capsys: pytest.CaptureFixture[str]) -> None:
    from bnfuse import __version__

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"bnfuse {__version__}"
    code, out, _ = run_cli(["-h"], capsys)
    assert code == 0 and "Usage: bnfuse" in out
    code, out, _ = run_cli(["fuse", "-h"], capsys)
    assert code == 0 and "--output" in out


@pytest.mark.parametrize(
    "early",
    [["-q", "--seed", "3"], ["-q", "--max-memory", "2"], ["-q", "--samples", "2", "-f"]],
    ids=["seed", "max-memory", "samples"],
)
def test_options_may_come_before_the_input(
    early: list[str], model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every option that takes a value, as typer declares it, is skipped with its value
    when looking for the input (--max-memory's value was once taken for the input)."""
    out = model_path.with_name("early.onnx")
    code, text, err = run_cli([*early, str(model_path), "-o", str(out)], capsys)
    assert code == 0, err
    assert out.exists() and text.startswith("PASS: ")


@pytest.mark.parametrize("command", ["fuse", "verify"])
def test_the_junit_report_of_a_run_that_failed_to_load_names_the_run(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was <testsuite name="bnfuse verify "> for either command (a trailing space, no
    model, "verify" for a fuse run)."""
    import xml.etree.ElementTree as ET

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    report = tmp_path / "r.xml"
    args = (
        [str(bad), "-o", str(tmp_path / "f.onnx")]
        if command == "fuse"
        else ["verify", str(bad), str(bad)]
    )
    code, _, _ = run_cli([*args, "--report", str(report)], capsys)
    assert code == 2
    suite = ET.fromstring(report.read_text()).find("testsuite")
    assert suite is not None and suite.get("name") == f"bnfuse {command} bad.onnx"


@pytest.mark.parametrize(
    ("sample", "words"),
    [("skip_fp16_overflow.onnx", "fused weight peak 1.3e+05 (198% of the float16 range)"),
     ("conv_bn_fp16.onnx", "fused weight peak 3.22 (under 1% of the float16 range)")],
    ids=["overflows", "small"],
)  # fmt: skip
def test_inspect_says_the_fused_peak_as_a_share_of_the_range(
    sample: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "(2 of the float16 range)" for a weight at twice the float16 maximum."""
    code, out, _ = run_cli(["inspect", str(SAMPLES / sample)], capsys)
    assert code == 0 and words in " ".join(out.split()), out


def test_inspect_check_exits_1_while_a_fold_is_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """For a pre-commit hook or a CI step: 1 for a model with a fold left (saying which), 0
    once fused, 0 for one whose BatchNorms cannot fold."""
    src = SAMPLES / "conv2d_bn.onnx"
    code, _, err = run_cli(["inspect", str(src), "--check"], capsys)
    assert code == 1 and "1 fold(s) left (bn)" in err
    fused = tmp_path / "f.onnx"
    assert run_cli([str(src), "-o", str(fused), "--no-verify", "-q"], capsys)[0] == 0
    assert run_cli(["inspect", str(fused), "--check"], capsys)[0] == 0
    assert run_cli(["inspect", str(SAMPLES / "skip_two_consumers.onnx"), "--check"], capsys)[0] == 0
    assert run_cli(["inspect", str(src)], capsys)[0] == 0  # without --check: a report only


def test_help_lists_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["-h"], capsys)
    assert code == 0 and "bnfuse --version" in out


@pytest.mark.parametrize("command", ["verify", "inspect", "fuse"])
def test_options_may_come_before_the_command(
    command: str, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bnfuse -q verify A B`` as ``bnfuse verify -q A B``: an option before the command is
    the command's (it was refused: "No such option: -q")."""
    early, rest = {
        "verify": (["-q", "--seed", "3"], [str(model_path), str(model_path)]),
        "inspect": (["--json"], [str(model_path)]),
        "fuse": (["-q"], [str(model_path), "-o", str(model_path.with_name("f.onnx"))]),
    }[command]
    code, text, err = run_cli([*early, command, *rest], capsys)
    assert code == 0, err
    assert text.startswith("PASS: ") if command != "inspect" else text.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["{m}", "--bogus"], "No such option: --bogus"),
        (["{m}", "-o", "{f}", "--samples", "0"], "Invalid value for '--samples'"),
        (["a.onnx", "b.onnx", "-o", "{d}", "-j", "0"], "Invalid value for '--jobs'"),
        (["{m}", "-o", "{f}", "--inputs", "{d}/none.npz"], "does not exist"),
        (["verify", "{m}"], "Missing argument 'candidate'"),
    ],
    ids=["unknown_option", "samples_0", "jobs_0", "missing_inputs_file", "missing_argument"],
)
def test_a_usage_error_is_one_line(
    args: list[str], words: str, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """click's usage errors in the one line the README promises, exit 2 (they were three:
    Usage, Try, Error)."""
    where = {
        "m": str(model_path),
        "f": str(model_path.with_name("f.onnx")),
        "d": str(model_path.parent),
    }
    code, out, err = run_cli([a.format(**where) for a in args], capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("bnfuse: error: ") and words in line and line.endswith(" -h)"), line
    assert not out


def test_a_mistyped_command_names_the_one_meant(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["verfy", "a.onnx", "b.onnx"], capsys)
    assert code == 2
    assert err.strip() == "bnfuse: error: unknown command 'verfy'; did you mean 'verify'?"


def test_several_inputs_without_output_say_batch_needs_a_folder(
    model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli([str(model_path), str(model_path.with_name("gemm.onnx"))], capsys)
    assert code == 2 and "needs -o DIR" in err


def _with_reader_gone(argv: list[str], in_process: bool) -> subprocess.CompletedProcess[str]:
    """bnfuse with standard output a pipe whose reader has already gone, as `| head -0`
    leaves it: every write to it fails (EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "BNFUSE_IN_PROCESS": "1" if in_process else ""}
    try:
        return subprocess.run(
            [sys.executable, "-m", "bnfuse", *argv], stdout=write, stderr=subprocess.PIPE,
            text=True, env=env, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)


def _perturbed(src: Path, fused: Path, bad: Path) -> None:
    """``fused`` with one weight moved by 0.5: a fusion verification must fail."""
    import bnfuse

    bnfuse.fuse(src, fused)
    model = onnx.load(str(fused))
    weight = next(t for t in model.graph.initializer if t.name == "layer.W")
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, bad)


@pytest.mark.parametrize("in_process", [False, True], ids=["supervised", "in-process"])
@pytest.mark.parametrize(
    ("case", "code"),
    [("fuse", 0), ("fuse-quiet", 0), ("fuse-report", 0), ("inspect", 0), ("inspect-json", 0),
     ("batch", 0), ("verify-fails", 1)],
)  # fmt: skip
def test_a_reader_that_leaves_early_changes_no_outcome(
    case: str, code: int, in_process: bool, tmp_path: Path
) -> None:
    """`bnfuse ... | head -1` under `set -o pipefail`: the exit code is the run's (0 for a
    pass, 1 for a failed verification), never click's or rich's 1 for a closed pipe or an
    error, and the run writes all it was asked to."""
    src = tmp_path / "m.onnx"
    onnx.save(layer_bn("Conv"), src)
    out, report = tmp_path / "f.onnx", tmp_path / "r.json"
    argv = {
        "fuse": [str(src), "-o", str(out)],
        "fuse-quiet": [str(src), "-o", str(out), "-q"],
        "fuse-report": [str(src), "-o", str(out), "--report", str(report)],
        "inspect": ["inspect", str(src)],
        "inspect-json": ["inspect", str(src), "--json"],
        "batch": [str(src), str(SAMPLES / "conv2d_bn.onnx"), "-o", f"{tmp_path / 'out'}/"],
        "verify-fails": ["verify", str(src), str(tmp_path / "bad.onnx")],
    }[case]
    if case == "verify-fails":
        _perturbed(src, tmp_path / "good.onnx", tmp_path / "bad.onnx")
    proc = _with_reader_gone(argv, in_process)
    assert proc.returncode == code, proc.stderr
    assert "error" not in proc.stderr
    if case.startswith("fuse"):
        assert onnx.load(str(out)).graph.node[0].op_type == "Conv"
    if case == "fuse-report":
        assert json.loads(report.read_text())["passed"] is True
    if case == "batch":
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["conv2d_bn.onnx", "m.onnx"]


def _stderr_on_a_terminal(args: list[str]) -> str:
    """What the command writes to stderr when stderr is a terminal (a pseudo-terminal here),
    with the terminal's control sequences taken out."""
    import pty  # noqa: F401  (POSIX only: the test is skipped elsewhere)
    import re

    primary, secondary = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnfuse", *args], stdout=subprocess.DEVNULL, stderr=secondary,
        env={**os.environ, "COLUMNS": "100"},
    )  # fmt: skip
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        out += chunk
    proc.wait()
    os.close(primary)
    return re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", out).decode(errors="replace")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_the_progress_bar_names_the_stage_that_runs(verify: bool, tmp_path: Path) -> None:
    """It read "verifying ... 0/? loading" through the whole fuse, with --no-verify too."""
    src = SAMPLES / "torch_densenet_opset17.onnx"
    args = [str(src), "-o", str(tmp_path / "f.onnx")] + ([] if verify else ["--no-verify"])
    shown = _stderr_on_a_terminal(args)
    assert "fusing" in shown and "reading, folding, writing" in shown, shown
    assert ("verifying" in shown) == verify, shown


@pytest.mark.parametrize("quiet", [False, True], ids=["summary", "quiet"])
def test_report_dash_prints_the_json_report_on_stdout(
    quiet: bool, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """For scripts that pipe it: standard output holds the JSON report alone, and the
    summary (or the one line of -q) goes to stderr."""
    out_path = model_path.with_name("f.onnx")
    args = [str(model_path), "-o", str(out_path), "--report", "-"] + (["-q"] if quiet else [])
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["schema"] == "bnfuse-report" and report["passed"] is True
    assert report["fusion"]["found"] == 1 and report["fusion"]["outputs"] == [str(out_path)]
    assert (
        ("PASS: " in err) if quiet else ("1 BatchNormalization found" in err and "verify" in err)
    ), err
    assert not (model_path.parent / "-").exists()


def test_report_dash_carries_the_error_of_a_run_that_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    code, out, err = run_cli([str(bad), "-o", str(tmp_path / "f.onnx"), "--report", "-"], capsys)
    assert code == 2 and "not a readable ONNX model" in json.loads(out)["error"]
    assert err.startswith("bnfuse: error: ")


def test_report_dash_is_for_one_model(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        [str(model_path.parent), "-o", str(model_path.parent / "out"), "--report", "-"], capsys
    )
    assert code == 2 and not out and "batch mode writes its report to a file" in err


def test_the_pre_commit_hook_fails_while_a_committed_model_has_a_fold_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """.pre-commit-hooks.yaml's entry, given files as pre-commit gives them (several at
    once): 0 when every model is fused, 1 naming the one with a fold left."""
    import re

    hooks = (SAMPLES.parent / ".pre-commit-hooks.yaml").read_text()
    entry = re.search(r"^\s*entry: (.+)$", hooks, re.M)
    files = re.search(r"^\s*files: (.+)$", hooks, re.M)
    assert entry is not None and files is not None
    command = entry.group(1).split()
    assert command[0] == "bnfuse" and re.search(files.group(1), "models/net.onnx")
    src = SAMPLES / "conv2d_bn.onnx"
    fused = tmp_path / "fused.onnx"
    assert run_cli([str(src), "-o", str(fused), "--no-verify", "-q"], capsys)[0] == 0
    code, out, err = run_cli(
        [*command[1:], str(fused), str(SAMPLES / "layernorm_untouched.onnx")], capsys
    )
    assert code == 0 and not out and not err
    code, out, err = run_cli([*command[1:], str(fused), str(src)], capsys)
    assert code == 1 and not out
    assert err.strip() == f"bnfuse: {src}: 1 fold(s) left (bn); bnfuse {src} -o FUSED makes them"
