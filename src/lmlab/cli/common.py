"""What every command shares: the consoles, JSON output, model loading with a spinner, the stats line."""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console

from lmlab.errors import LmlabError

# Content goes to stdout; stats, progress and errors to stderr, so pipes stay clean.
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
PIPED_WIDTH = 160  # columns of tables on a piped stdout when COLUMNS is not set


def size_consoles() -> None:
    """Fit the consoles to this run: COLUMNS when it is set, else the terminal's width; a piped
    stdout gets 160 columns, so tables are not squeezed to 80. (stderr reads COLUMNS itself.) A
    piped stderr is not wrapped at all: a message's path or command stays whole on its line."""
    cols = os.environ.get("COLUMNS", "")
    out.width = None if out.is_terminal or cols.isdigit() else PIPED_WIDTH
    err.soft_wrap = not err.is_terminal


size_consoles()  # main() calls it again for each command


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")


def write_text(text: str) -> None:
    """Generated text exactly as it is: no wrapping, no markup, nothing added (rich would break lines)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def print_stats(parts: list[str], style: str = "") -> None:
    """A stats line on stderr, its figures joined by ' · '. On a terminal it breaks only between
    figures (never inside 'prefill 178 tok/s'); to a file or pipe it is one line."""
    lines = [" · ".join(parts)]
    if err.is_terminal:
        width, lines = err.width, [parts[0]] if parts else []
        for p in parts[1:]:
            if len(lines[-1]) + 3 + len(p) <= width:
                lines[-1] += " · " + p
            else:
                lines.append("· " + p)
    for line in lines:
        err.print(line, style=style, markup=False, highlight=False, soft_wrap=True)


_NATIVE_NOTED = False


def note_native_off() -> None:
    """Say once per process when the native decoding step is off because lmlab's home cannot be
    written (it builds into $LMLAB_HOME/native): decoding then runs through PyTorch, slower."""
    global _NATIVE_NOTED
    if _NATIVE_NOTED:
        return
    from lmlab import native

    status = native.status()
    if status.startswith("off: could not build or load"):
        _NATIVE_NOTED = True
        from lmlab.host import lmlab_home

        err.print(
            f"note: the native decoding step is off because {lmlab_home() / 'native'} cannot be written, so "
            "decoding runs through PyTorch (about 2x slower); set LMLAB_HOME to a writable folder.",
            markup=False,
            highlight=False,
        )


QUANT_HELP = "native (a GGUF file's own blocks) | q8 | q4 (quantize a float model at load) | none"


def quant_opt():
    """``--quant`` for every command that loads a model (lmlab.load's ``quant``)."""
    import typer

    return typer.Option(None, "--quant", help=QUANT_HELP)


def model_opt():
    """``-m/--model`` for the commands that also take the model as their first argument."""
    import typer

    return typer.Option(None, "--model", "-m", help="The model, as the first argument takes it (pass one of the two).")


def one_model(first: str | None, option: str | None, default: str | None = None) -> str | None:
    """The model a command was given: its first argument or ``-m`` (the same one twice is fine)."""
    if first is not None and option is not None and first != option:
        raise LmlabError(f"two models were given ({first} as the first argument, {option} with -m); pass one.")
    return option if option is not None else first if first is not None else default


def load_model(name: str, dtype: str = "float32", device: str = "cpu", quiet: bool = False, **kw):
    """lmlab.load with a status line on stderr (loading takes seconds). Ctrl-C during the load
    says so in one line (exit 130)."""
    import lmlab

    try:
        if quiet or not err.is_terminal:
            lm = lmlab.load(name, dtype=dtype, device=device, **kw)
        else:
            with err.status(f"loading {name} ({dtype or 'its own dtype'}, {device})"):
                lm = lmlab.load(name, dtype=dtype, device=device, **kw)
    except KeyboardInterrupt:
        import typer

        err.print(f"interrupted while loading {name}; nothing was run.", markup=False, highlight=False)
        raise typer.Exit(130) from None
    if str(device) == "cpu" or getattr(getattr(lm, "device", None), "type", "cpu") == "cpu":
        note_native_off()
    return lm
