"""The `finetune` command: a thin typer skin over `finetune.api`. Errors become one line and exit code 2.

Importing the command modules registers their commands on `app`; the API (and torch) loads only when a command runs.
"""

from __future__ import annotations

from finetune.cli import training, using
from finetune.cli.base import app

__all__ = ["app", "main", "training", "using"]


def main() -> None:
    """Console-script entry point."""
    app(prog_name="finetune")
