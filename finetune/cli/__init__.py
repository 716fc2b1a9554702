"""The `finetune` command: a thin typer skin over `finetune.api`. Errors become one line and exit code 2.

Importing the command modules registers their commands on `app`; the API (and torch) loads only when a command runs.
"""

from __future__ import annotations

import typer

from finetune.cli import recipes, serving, training, using
from finetune.cli.base import app, echo

__all__ = ["app", "main", "recipes", "serving", "training", "using"]


def _usage_errors() -> tuple[type[Exception], tuple[type[Exception], ...]]:
    """(click's UsageError, the errors that already printed the help) of the click that typer runs on."""
    try:  # typer >= 0.2x carries its own click
        from typer._click import exceptions
    except ImportError:  # older typer runs on click itself
        from click import exceptions  # type: ignore[no-redef]
    shown = getattr(exceptions, "NoArgsIsHelpError", None)
    return exceptions.UsageError, (shown,) if shown is not None else ()


def main() -> None:
    """Console-script entry point: a mistyped command line is one line too (what, and where to read the usage)."""
    usage_error, help_shown = _usage_errors()
    try:
        code = typer.main.get_command(app).main(prog_name="finetune", standalone_mode=False)
    except help_shown as exc:
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except usage_error as exc:
        context = getattr(exc, "ctx", None)
        where = context.command_path if context is not None else "finetune"
        echo(f"error: {getattr(exc, 'format_message', exc.__str__)().rstrip('.')}. See '{where} --help'.", err=True)
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)
