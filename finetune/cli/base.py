"""What every command shares: the typer app, option types, and the session that turns errors into one line."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm.contrib.logging import logging_redirect_tqdm

from finetune import __version__
from finetune.errors import FinetuneError
from finetune.files import disk_error, is_write_failure, written

HELP_STYLE: dict[str, Any] = {"rich_markup_mode": None}  # plain help: no '<bool>' on flags, '[test/]' stays text
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    **HELP_STYLE,
    help="Fine-tune ResNets on image folders from YAML recipes; evaluate and predict with the result.",
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, warnings only.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe field: --set train.epochs=3 (repeatable)."),
]


# What a name could do to a terminal: ANSI escapes (ESC), a carriage return that overwrites the line, bells,
# backspaces, C1 controls, bidirectional overrides that reorder what is shown; and bytes that are not UTF-8 (kept as
# surrogate escapes in file names), which the terminal's encoder would refuse. Line feeds and tabs stay.
UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def terminal_text(text: object) -> str:
    """`text` safe to print: every control character shown as an escape (\\x1b, \\r, \\u202e), never obeyed."""

    def shown(found: re.Match[str]) -> str:
        code = ord(found.group())
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, kept by surrogateescape: show the byte
            return f"\\x{code - 0xDC00:02x}"
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return UNSAFE.sub(shown, str(text))


def echo(text: object = "", *, err: bool = False, nl: bool = True) -> None:
    """typer.echo of `terminal_text(text)`: class and file names reach the terminal as text, never as commands."""
    typer.echo(terminal_text(text), err=err, nl=nl)


class TerminalFormatter(logging.Formatter):
    """Log lines through `terminal_text`, so a name inside a message cannot colour, move or rewrite the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return terminal_text(super().format(record))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune ResNets on image folders from YAML recipes; evaluate and predict with the result."""


def _log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None
) -> None:
    """Python warnings (Pillow's DecompressionBombWarning, numpy's RuntimeWarning, ...) as one log line each."""
    logging.getLogger("py.warnings").warning("warning: %s (%s)", message, category.__name__)


@contextlib.contextmanager
def _warnings_logged(quiet: bool) -> Iterator[None]:
    """Library warnings go through logging like finetune's own lines, and `--quiet` silences them; a write the OS
    refused in a library's background thread (TensorBoard's writer) is one line, not a thread's traceback."""
    shown, hook, captured = warnings.showwarning, threading.excepthook, logging.getLogger("py.warnings")
    saved = captured.level

    def thread_failed(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and is_write_failure(args.exc_value):
            logging.getLogger("finetune").debug("a background write failed: %s", args.exc_value)  # re-raised in the main thread
        else:
            hook(args)

    warnings.showwarning, threading.excepthook = _log_warning, thread_failed
    captured.setLevel(logging.ERROR if quiet else logging.WARNING)
    try:
        yield
    finally:
        warnings.showwarning, threading.excepthook = shown, hook
        captured.setLevel(saved)


@contextlib.contextmanager
def session(quiet: bool, debug: bool, *, resumable: bool = False) -> Iterator[None]:
    """Logging for the command, and every FinetuneError as a single line with exit code 2 (so is a write the OS
    refused: a full disk, a file-size limit, a read-only place); Ctrl-C exits 130, with how to continue for a command
    that can (`resumable`: train) and without training advice for the others."""
    follower = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 speaks for the job
    level = logging.ERROR if follower else logging.WARNING if quiet else logging.INFO
    root, ours = logging.getLogger(), logging.getLogger("finetune")
    saved = root.handlers[:], root.level, ours.level
    # finetune's own messages at `level`; other libraries' (onnxruntime's quantizer logs every tensor) warnings only
    logging.basicConfig(level=max(level, logging.WARNING), format="%(message)s", force=True)
    for handler in root.handlers:
        handler.setFormatter(TerminalFormatter("%(message)s"))
    ours.setLevel(level)
    try:
        with logging_redirect_tqdm(), _warnings_logged(quiet):  # log lines print above the progress bars
            try:
                yield
            except (OSError, RuntimeError) as exc:  # a write no library-level guard caught
                if debug or not is_write_failure(exc):
                    raise
                raise disk_error(written(Path(getattr(exc, "filename", None) or "a file")), exc) from None
    except FinetuneError as exc:
        if debug:
            raise
        echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        if resumable:
            typer.echo("interrupted; completed epochs are checkpointed: continue with 'finetune train --resume RUN'", err=True)
        else:
            typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    finally:  # called in-process (tests, notebooks), the command leaves logging as it found it
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        ours.setLevel(saved[2])


def timestamped(prefix: str) -> Path:
    from finetune.run_dir import timestamped_run

    return timestamped_run(prefix)
