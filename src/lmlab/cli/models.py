"""`lmlab models` (what can be loaded) and `lmlab info MODEL` (an architecture card)."""

from __future__ import annotations

from collections import defaultdict

import typer
from rich.table import Table

from lmlab.cli.common import err, load_model, model_opt, one_model, out, print_json
from lmlab.config import ALIASES, ModelConfig
from lmlab.errors import LmlabError


def models(json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List the model names lmlab knows, with family, size and whether each loads offline now."""
    from lmlab.loading.resolve import available_offline

    rows = []
    for a in ALIASES.values():
        rows.append(
            dict(
                name=a.name,
                family=a.family,
                size=a.size,
                hub_id=a.hub_id,
                offline=available_offline(a.name),
                bundled=bool(a.bundled),
                instruct=a.instruct,
            )
        )
    if json_out:
        return print_json(rows)
    t = Table(title="models (any local folder, .gguf file, nanoGPT ckpt.pt or hub id org/name also works)")
    for col in ("name", "family", "size", "offline now", "hub id"):  # long cells wrap, never cut
        t.add_column(col, overflow="fold", no_wrap=col == "name")
    for r in rows:
        off = (
            "[green]yes[/] (bundled)"
            if r["offline"] and r["bundled"]
            else ("[green]yes[/] (cached)" if r["offline"] else "no: needs network once")
        )
        t.add_row(r["name"], r["family"], r["size"], off, r["hub_id"])
    out.print(t)


def differences_from_gpt2(cfg: ModelConfig) -> list[str]:
    """What this architecture does differently from GPT-2, in plain words."""
    d = []
    if cfg.pos == "rope":
        part = f" on {cfg.rotary_dim} of {cfg.head_dim} dims per head" if cfg.rotary_dim != cfg.head_dim else ""
        d.append(
            f"RoPE (rotary position embeddings, base {cfg.rope_theta:g}{part}) instead of learned position embeddings"
        )
        if cfg.rope_local_theta is not None:
            d.append(
                f"two RoPE bases: {cfg.rope_local_theta:g} on sliding-window layers, "
                f"{cfg.rope_theta:g} on global layers"
            )
        if cfg.rope_scaling:
            d.append(
                f"RoPE frequencies rescaled ({cfg.rope_scaling.get('rope_type')}, "
                f"factor {cfg.rope_scaling.get('factor')}) for a longer context"
            )
    if cfg.norm == "rmsnorm":
        d.append(
            "RMSNorm (no mean subtraction, no bias) instead of LayerNorm"
            + (", scaling by (1 + w)" if cfg.norm_weight_offset else "")
        )
    if cfg.sandwich_norm:
        d.append("extra norms after attention and after the MLP (pre- and post-norm around each sublayer)")
    if cfg.n_kv_heads != cfg.n_heads:
        kind = "multi-query attention" if cfg.n_kv_heads == 1 else "grouped-query attention"
        d.append(
            f"{kind}: {cfg.n_heads} query heads share {cfg.n_kv_heads} key/value heads ({cfg.gqa_groups} per group), "
            f"a {cfg.gqa_groups}x smaller KV cache"
        )
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        d.append(
            f"heads of {cfg.head_dim} dims: n_heads x head_dim = {cfg.n_heads * cfg.head_dim} != d_model {cfg.d_model}"
        )
    if cfg.mlp == "gated":
        name = {"silu": "SwiGLU", "gelu_tanh": "GeGLU", "gelu": "GeGLU"}[cfg.act]
        d.append(f"{name} MLP: down(act(gate x) * up x), three matrices instead of two")
    if cfg.qk_norm:
        d.append("QK-norm: queries and keys are RMS-normalised per head before RoPE")
    if not cfg.qkv_bias and cfg.family != "gpt2":
        d.append("no biases in the attention projections")
    elif cfg.qkv_bias and not cfg.attn_out_bias and cfg.family != "gpt2":
        d.append("biases on q, k, v only (not on the output projection)")
    if cfg.parallel_residual:
        d.append("parallel residual: attention and MLP both read the block input, x + attn(ln1 x) + mlp(ln2 x)")
    if cfg.sliding_window:
        n_sl = cfg.layer_types.count("sliding")
        d.append(f"sliding-window attention ({cfg.sliding_window} tokens) on {n_sl} of {cfg.n_layers} layers")
    if not cfg.tie_embeddings:
        d.append("a separate output (unembedding) matrix, not tied to the token embeddings")
    if cfg.embed_scale:
        d.append(f"embeddings multiplied by sqrt(d_model) = {cfg.embed_scale:.2f}")
    if cfg.attn_scale is not None and abs(cfg.attn_scale - cfg.head_dim**-0.5) > 1e-9:
        d.append(f"attention scale {cfg.attn_scale:.4f} instead of 1/sqrt(head_dim)")
    if cfg.act == "gelu" and cfg.mlp == "plain" and cfg.family != "gpt2":
        d.append("exact GELU instead of GPT-2's tanh approximation")
    if cfg.family == "gpt2" and not d:
        d.append("none: this is the GPT-2 architecture")
    return d


def param_groups(model) -> dict[str, int]:
    """Parameter counts by component (tied weights counted once, under embeddings)."""
    groups: dict[str, int] = defaultdict(int)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embed" in name:
            g = "embeddings"
        elif "norm" in name:
            g = "norms"
        elif ".attn." in name:
            g = "attention"
        elif ".mlp." in name:
            g = "mlp"
        elif name.startswith("lm_head"):
            g = "head (unembedding)"
        else:
            g = "other"
        groups[g] += p.numel()
    return dict(groups)


def info_card(lm) -> dict:
    cfg, model = lm.config, lm.model
    n = lm.num_parameters
    groups = param_groups(model)
    block = {
        name.removeprefix("blocks.0."): list(p.shape)
        for name, p in model.named_parameters()
        if name.startswith("blocks.0.")
    }
    card = dict(
        name=lm.name,
        family=cfg.family,
        source=str(lm.resolved.path) if lm.resolved else None,
        source_kind=lm.resolved.kind if lm.resolved else None,
        parameters=n,
        parameters_by_component=groups,
        weight_bytes={
            "float32": n * 4,
            "bfloat16": n * 2,
            "float16": n * 2,
            "int8 (weight-only)": n,
            "int4 (weight-only)": n // 2,
        },
        differences_from_gpt2=differences_from_gpt2(cfg),
        block_0_weights=block,
        config=cfg.to_dict(),
        loaded_dtype=str(lm.dtype).removeprefix("torch."),
        load_seconds=round(lm.load_seconds, 3),
    )
    on_disk = getattr(lm, "source_tensor_types", None)
    if on_disk:
        counts: dict[str, int] = defaultdict(int)
        for t in on_disk.values():
            counts[t] += 1
        card["tensor_types_on_disk"] = dict(counts)
    return card


def info(
    model: str = typer.Argument(None, help="Model name, local path or hub id."),
    model_option: str = model_opt(),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """An architecture card: config, parameters by component, bytes per dtype, how it differs from GPT-2."""
    model = one_model(model, model_option)
    if model is None:
        raise LmlabError("name the model: lmlab info MODEL (or -m MODEL); `lmlab models` lists them.")
    lm = load_model(model, "float32")
    card = info_card(lm)
    if json_out:
        return print_json(card)
    cfg = lm.config
    out.print(
        f"[bold]{lm.name}[/]  family [bold]{cfg.family}[/]  {card['parameters'] / 1e6:.1f}M parameters  "
        f"({card['source_kind']}: {card['source']})"
    )
    if "tensor_types_on_disk" in card:
        out.print(
            "tensor types on disk: " + ", ".join(f"{k} x{v}" for k, v in sorted(card["tensor_types_on_disk"].items()))
        )

    t = Table(title="parameters by component")
    t.add_column("component", no_wrap=True)
    t.add_column("parameters", justify="right")
    t.add_column("share", justify="right")
    for g, c in sorted(card["parameters_by_component"].items(), key=lambda kv: -kv[1]):
        t.add_row(g, f"{c:,}", f"{100 * c / card['parameters']:.1f}%")
    out.print(t)

    t = Table(title="weight bytes")
    t.add_column("dtype", no_wrap=True)
    t.add_column("bytes", justify="right")
    for k, v in card["weight_bytes"].items():
        t.add_row(k, _mb(v))
    out.print(t)

    out.print("[bold]different from GPT-2[/]")
    for line in card["differences_from_gpt2"]:
        out.print(f"  - {line}")

    t = Table(title="one block (blocks.0): every weight")
    t.add_column("weight", no_wrap=True)
    t.add_column("shape", overflow="fold")
    t.add_column("what", style="dim", overflow="fold")
    for name, shape in card["block_0_weights"].items():
        t.add_row(name, " x ".join(map(str, shape)), _weight_note(name, cfg))
    out.print(t)

    t = Table(title="config")
    t.add_column("field", no_wrap=True)
    t.add_column("value", overflow="fold")
    for k, v in card["config"].items():
        if k == "layer_types" and v and len(set(v)) == 1:
            v = f"all {v[0]} ({len(v)})"
        t.add_row(k, str(v))
    out.print(t)
    err.print(f"loaded in {lm.load_seconds:.2f} s")


def _weight_note(name: str, cfg: ModelConfig) -> str:
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    notes = {
        "attn.qkv.weight": f"q ({H}x{D}), k ({K}x{D}), v ({K}x{D}) stacked",
        "attn.qkv.bias": "q, k, v biases stacked",
        "attn.o.weight": "output projection, heads -> d_model",
        "mlp.up.weight": "gate and up stacked (gate first)" if cfg.mlp == "gated" else "up projection d_model -> d_ff",
        "mlp.down.weight": "down projection d_ff -> d_model",
        "attn.q_norm.weight": "QK-norm on queries (per head)",
        "attn.k_norm.weight": "QK-norm on keys (per head)",
    }
    return notes.get(name, "")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("info")(info)
