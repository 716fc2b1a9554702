"""`finetune recipes` (one line each) and `finetune recipes show NAME` (the YAML, to copy and edit)."""

from __future__ import annotations

from typing import Annotated

import typer

from finetune.cli.base import HELP_STYLE, Debug, Quiet, app, echo, session

recipes_app = typer.Typer(
    help="The built-in recipes: any name works where a recipe file does (finetune train last_stage --data D).",
    invoke_without_command=True,
    **HELP_STYLE,
)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes(context: typer.Context, quiet: Quiet = False, debug: Debug = False) -> None:
    """List the built-in recipes, one line each; 'finetune recipes show NAME' prints one."""
    if context.invoked_subcommand is not None:
        return
    with session(True, debug):
        from finetune.runs import recipes as listing  # torch-free: the list answers at once

        shipped = listing.recipes()
        width = max(len(recipe.name) for recipe in shipped)
        for recipe in shipped:
            echo(f"{recipe.name:<{width}}  {recipe.summary}")
        echo("\nfinetune recipes show NAME > mine.yaml  # a copy to edit; finetune train NAME --data D  # as it is")


@recipes_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="A built-in recipe, e.g. last_stage.")],
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Print a built-in recipe's YAML (redirect it to a file to edit it)."""
    with session(True, debug):
        from finetune.runs import recipes as listing

        echo(listing.show_recipe(name=name), nl=False)
