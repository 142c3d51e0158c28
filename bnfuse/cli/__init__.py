"""The ``bnfuse`` command: parse, call the library, print, set the exit code.

One module a command (``fuse``, ``verify``, ``inspect``); the options they share are
declared once (``options``), and what each does around its library call once
(``running``). Exit codes: bnfuse.cli.app. ``bnfuse IN -o OUT`` is short for
``bnfuse fuse IN -o OUT``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator

import typer

from bnfuse.cli import fuse, inspect, verify  # noqa: F401  (each registers its command)
from bnfuse.cli.app import EXIT_OK, EXIT_USAGE, app
from bnfuse.formats import is_pattern

__all__ = ["app", "main"]


_COMMANDS = {"fuse", "verify", "inspect"}
# The cyclic garbage collector's thresholds for the command (as mypy sets them for its
# own run). A fuse makes some objects a node and frees them by reference counting; at
# Python's default (700 allocations) the collector scanned everything alive hundreds
# of times: 0.5 s of 3.1 s on a 30,000-node graph, measured. A library caller keeps
# its own settings.
_GC_THRESHOLDS = (100_000, 50, 50)


def _valued_options() -> set[str]:
    """The options of any command that take a value (``-o OUT``), as typer declares them:
    so that the input can be found among the words before it."""
    group = typer.main.get_command(app)
    names: set[str] = set()
    for command in getattr(group, "commands", {}).values():
        for param in command.params:  # click's (or typer's own copy of click's) parameters
            option = getattr(param, "param_type_name", "") == "option"
            if option and not getattr(param, "is_flag", False) and not getattr(param, "count", 0):
                names.update(param.opts)
    return names


def _route(args: list[str]) -> list[str] | str:
    """``bnfuse [OPTIONS] IN ...`` is ``bnfuse fuse [OPTIONS] IN ...``; or a usage error.

    Options may come before the input (``bnfuse -q m.onnx -o f.onnx``) and before
    the command (``bnfuse -q verify a.onnx b.onnx``: they are the command's). A
    first word that is no file but looks like a command (``verfy``) is a typo.
    """
    first = None
    after_dashes = False  # ``--``: what follows is an input, whatever its name
    valued: set[str] | None = None  # read from typer only if an option comes first
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            first, after_dashes = (i + 1 if i + 1 < len(args) else None), True
            break
        if not word.startswith("-") or word == "-":
            first = i
            break
        if valued is None:
            valued = _valued_options()
        i += 2 if word in valued else 1
    if first is None:
        return args
    if args[first] in _COMMANDS and not after_dashes:
        return [args[first], *args[:first], *args[first + 1 :]]
    word = args[first]
    if not os.path.exists(word) and not is_pattern(word):
        import difflib

        close = difflib.get_close_matches(word, sorted(_COMMANDS), n=1, cutoff=0.6)
        if close:
            return f"unknown command '{word}'; did you mean '{close[0]}'?"
    return ["fuse", *args]


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``bnfuse IN ...`` routes to ``bnfuse fuse IN ...``.

    Usage errors exit 2 (click's own code for them), as the contract says. As
    the ``bnfuse`` command (``argv`` None) the work runs in a child process
    that a crash cannot take the cleanup with (bnfuse.supervise); called with
    ``argv`` (tests, embedding) it runs here.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None:  # the command's own process, not a program that embeds bnfuse
        gc.set_threshold(*_GC_THRESHOLDS)
    if args in (["--version"], ["-V"]):
        from bnfuse import __version__

        typer.echo(f"bnfuse {__version__}")
        raise SystemExit(EXIT_OK)
    routed = _route(args)
    if isinstance(routed, str):
        typer.echo(f"bnfuse: error: {routed}", err=True)
        raise SystemExit(EXIT_USAGE)
    args = routed
    from bnfuse import supervise

    if argv is None and supervise.available() and not os.environ.get("BNFUSE_IN_PROCESS"):
        code = supervise.run(lambda: _exit_code(args))
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to add
                stream.flush()
        os._exit(code)  # the child did the work: nothing here needs the interpreter's teardown
    raise SystemExit(_exit_code(args))


@contextlib.contextmanager
def _quiet_libraries(debug: bool) -> Iterator[None]:
    """Libraries' warnings and log lines stay off stderr: bnfuse says what matters itself.

    numpy's RuntimeWarnings from constant evaluation, torch's UserWarnings and
    FutureWarnings, its loggers' tracebacks: a CI log holds one line for an
    error and nothing for a success. ``--debug`` lets them through.
    """
    if debug:
        yield
        return
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _exit_code(args: list[str]) -> int:
    """Run the app; SIGTERM, SIGHUP and Ctrl-C end it after cleanup, with 128 + the signal."""
    from bnfuse import outputs
    from bnfuse.outputs import Terminated, terminate_on_signals

    outputs.published.clear()  # this run's files only
    with outputs.replacing():  # a file replaced with --force comes back if the run fails
        try:
            with terminate_on_signals(), _quiet_libraries("--debug" in args):
                code = app(args=args, prog_name="bnfuse", standalone_mode=False)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:
            if not _is_click_error(exc):
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare ``bnfuse``: the help, as ever
                typer.echo(exc.format_message(), err=True)  # type: ignore[attr-defined]
            else:
                typer.echo(f"bnfuse: error: {_usage_line(exc)}", err=True)
            return int(getattr(exc, "exit_code", EXIT_USAGE))
        except Terminated as exc:
            outputs.remove_published()  # a stopped run leaves nothing, not even a complete one
            message = f"bnfuse: error: stopped by {exc}; nothing partial was left behind"
            typer.echo(message, err=True)
            return 128 + exc.signum
    return code if isinstance(code, int) else 0


def _is_click_error(exc: Exception) -> bool:
    """click's own errors (usage, bad values, missing files), from click or typer's copy of
    it: each is said in one line, not click's three."""
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)


def _usage_line(exc: Exception) -> str:
    """click's message, and where the command's help is: ``No such option: --bogus (see
    bnfuse fuse -h)``."""
    message = str(exc.format_message()).rstrip(".")  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    where = getattr(ctx, "command_path", None) or "bnfuse"
    return f"{message} (see {where} -h)"
