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
COMMAND_MODULES = ["models", "generate", "inspect_cmds", "bench", "serve", "eval", "train", "runs"]

_DEBUG = False


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    global _DEBUG
    _DEBUG = debug or _DEBUG


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"lmlab.cli.{name}").register(app)


def main(argv: list[str] | None = None) -> int:
    global _DEBUG
    argv = list(sys.argv[1:] if argv is None else argv)
    _DEBUG = "--debug" in argv or env_flag("LMLAB_DEBUG", False)
    _register()
    try:
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
