"""`lmlab quantize MODEL --to q4 -o OUT.gguf`: quantize a float model and write it as GGUF."""

from __future__ import annotations

from pathlib import Path

import typer

from lmlab.cli.common import err, load_model, model_opt, one_model, out, print_json
from lmlab.errors import LmlabError


def quantize(
    model: str = typer.Argument(None, help="A float model: a local HF folder, an alias or a hub id."),
    model_option: str = model_opt(),
    to: str = typer.Option("q4", "--to", help="q8 (GGUF Q8_0) or q4 (GGUF Q4_1); groups of 32 values."),
    output: Path = typer.Option(..., "-o", "--output", help="The .gguf file to write."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Quantize a float model's matrices (per block of 32 values) and write a GGUF file that
    lmlab (and llama.cpp) can run."""
    import time

    from lmlab.quant.export import write_gguf

    model = one_model(model, model_option)
    if model is None:
        raise LmlabError("name the float model to quantize: lmlab quantize MODEL -o OUT.gguf (or -m MODEL).")
    kind = to.lower()
    if kind not in ("q8", "q4"):
        raise LmlabError(f"--to takes q8 or q4, got {to!r}.")
    if output.suffix != ".gguf":
        raise LmlabError(f"the output file should end in .gguf, got {output}; e.g. -o model-{kind}.gguf.")
    t0 = time.perf_counter()
    lm = load_model(model, None, "cpu", quant=kind)
    output.parent.mkdir(parents=True, exist_ok=True)
    size = write_gguf(lm, output, kind)
    facts = {"model": model, "to": kind, "output": str(output), "bytes": size, "seconds": time.perf_counter() - t0}
    if json_out:
        return print_json(facts)
    out.print(str(output))
    err.print(
        f"[dim]{model} -> {kind} ({'Q8_0' if kind == 'q8' else 'Q4_1'}, groups of 32): "
        f"{size / 1e6:.1f} MB in {facts['seconds']:.1f} s[/]"
    )


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
