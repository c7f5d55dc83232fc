"""`lmlab`: the command line. Each command group lives in its own module and registers here.

Errors: an LmlabError prints its one sentence on stderr and exits 2 (no traceback unless
--debug). Ctrl-C exits 130.
"""

from __future__ import annotations

import importlib
import sys

import typer

from lmlab.errors import LmlabError
from lmlab.host import env_flag

app = typer.Typer(
    name="lmlab",
    help="An inference-first laboratory for language models: run, look inside, change, measure, record.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules with a register(app) function, in the order their commands appear in --help.
COMMAND_MODULES = [
    "models",
    "generate",
    "inspect_cmds",
    "bench",
    "quantize",
    "serve",
    "eval",
    "train",
    "finetune",
    "merge",
    "runs",
]

_DEBUG = False


def _print_version(value: bool) -> None:
    if value:
        import platform

        from lmlab import __version__

        sys.stdout.write(f"lmlab {__version__} (python {platform.python_version()})\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", help="Print lmlab's version and exit.", callback=_print_version, is_eager=True
    ),
):
    global _DEBUG
    _DEBUG = debug or _DEBUG


# How --help names the type of each value (typer's own labels are Python's: <str>, <list[str]>, <bool>).
_TYPE_LABELS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH", "bool": "BOOLEAN"}


def _plain_help_types() -> None:
    """Make --help label each value plainly: nothing for flags, TEXT / INTEGER / FLOAT / PATH for
    values."""
    from typer import core

    typer_label = core._TyperParameter.display_type

    def label(self, ctx=None):
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        if getattr(self, "param_type_name", "") == "option" and self.metavar is not None:
            return self.metavar
        bare = (typer_label(self, ctx) or "").strip("<>")
        inner = bare[5:-1] if bare.startswith("list[") else bare  # repeatable: its help says so
        return _TYPE_LABELS.get(inner, inner.upper()) or None

    core.TyperOption.display_type_rich = label
    core.TyperArgument.display_type_rich = label


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"lmlab.cli.{name}").register(app)


def main(argv: list[str] | None = None) -> int:
    global _DEBUG
    argv = list(sys.argv[1:] if argv is None else argv)
    _DEBUG = "--debug" in argv or env_flag("LMLAB_DEBUG", False)
    _register()
    from lmlab.cli.common import size_consoles

    size_consoles()
    try:
        _plain_help_types()
        rv = app(argv, standalone_mode=False)
        # typer turns Ctrl-C (click's Abort) into a returned 130 rather than an exception
        return rv if isinstance(rv, int) else 0
    except LmlabError as e:
        if _DEBUG:
            raise
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # usage errors arrive here with standalone_mode=False
        import click
        from typer._click import exceptions as typer_click

        if type(e).__name__ == "NoArgsIsHelpError":  # help was already printed
            return 0
        if isinstance(e, (click.exceptions.ClickException, typer_click.ClickException)):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Abort) or type(e).__name__ == "Abort":
            return 130
        if _DEBUG:
            raise
        sys.stderr.write(
            f"error: {type(e).__name__}: {e} (run with --debug for the traceback; please report it as an lmlab bug)\n"
        )
        return 1


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
