"""The `seqlab` command. Thin: it parses arguments and calls the library.

seqlab ops                 # the ops, their forms and state sizes
seqlab check --seq-len 300 # run every form on random inputs and show its gap to `recurrent`
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table

from seqlab.ops import delta_rule, gated_linear
from seqlab.ops.attention import attention, naive_attention

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
console = Console()

# name, recurrence, forms, state per head per sequence (fp32 elements → bytes).
OPS = [
    (
        "gated_linear(g=None)",
        "S_t = S_{t-1} + k_t v_tᵀ (linear attention)",
        "recurrent, chunk, parallel",
        "4·K·V",
    ),
    (
        "gated_linear(g [B,T,H])",
        "S_t = exp(g_t) S_{t-1} + k_t v_tᵀ (RetNet, Mamba-2, simple GLA)",
        "recurrent, chunk, parallel",
        "4·K·V",
    ),
    (
        "gated_linear(g [B,T,H,K])",
        "S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ (GLA, HGRN-2)",
        "recurrent, chunk, parallel",
        "4·K·V",
    ),
    (
        "delta_rule(g=None)",
        "S_t = (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ (DeltaNet)",
        "recurrent, chunk, parallel",
        "4·K·V",
    ),
    (
        "delta_rule(g [B,T,H])",
        "S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ (Gated DeltaNet)",
        "recurrent, chunk, parallel",
        "4·K·V",
    ),
    (
        "attention(window=None)",
        "softmax(q kᵀ·scale) v, causal; KV cache for decode",
        "torch SDPA; naive reference",
        "2·T·(K+V)·bytes/elem (grows with T)",
    ),
    (
        "attention(window=w)",
        "sliding-window causal softmax attention",
        "torch SDPA; naive reference",
        "(w−1)·(K+V)·bytes/elem (bounded)",
    ),
]


@app.command()
def ops() -> None:
    """List the ops, their forms and the state each holds per head and sequence."""
    table = Table(title="seqlab.ops")
    for col in ("op", "recurrence", "forms", "state bytes per head"):
        table.add_column(col)
    for row in OPS:
        table.add_row(*row)
    console.print(table)


@app.command()
def check(
    seq_len: int = typer.Option(300, help="sequence length T"),
    chunk_size: int = typer.Option(64, help="chunk size C of the chunk form"),
    seed: int = typer.Option(0, help="random seed"),
) -> None:
    """Run every form in float64 on random inputs and print its largest gap to the reference."""
    if seq_len < 1 or chunk_size < 1:
        raise typer.BadParameter("seq-len and chunk-size must be positive")
    gen = torch.Generator().manual_seed(seed)
    B, T, H, K, V = 2, seq_len, 2, 16, 24

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v, S0 = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V), rand(B, H, K, V)
    kn = F.normalize(k, dim=-1)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    cases = {
        "gated_linear(g=None)": (gated_linear, dict(q=q, k=k, v=v)),
        "gated_linear(g [B,T,H])": (gated_linear, dict(q=q, k=k, v=v, g=-rand(B, T, H).abs())),
        "gated_linear(g [B,T,H,K])": (
            gated_linear,
            dict(q=q, k=k, v=v, g=-rand(B, T, H, K).abs()),
        ),
        "delta_rule(g=None)": (delta_rule, dict(q=q, k=kn, v=v, beta=beta)),
        "delta_rule(g [B,T,H])": (
            delta_rule,
            dict(q=q, k=kn, v=v, beta=beta, g=-rand(B, T, H).abs()),
        ),
    }
    table = Table(title=f"max |form − recurrent|, float64, B={B} T={T} H={H} K={K} V={V}")
    for col in ("op", "form", "output", "final state"):
        table.add_column(col)
    for name, (op, inputs) in cases.items():
        ref_o, ref_s = op(**inputs, initial_state=S0, output_final_state=True, form="recurrent")
        for form in ("chunk", "parallel"):
            extra = {"chunk_size": chunk_size} if form == "chunk" else {}
            o, s = op(**inputs, initial_state=S0, output_final_state=True, form=form, **extra)
            table.add_row(
                name,
                form,
                f"{(o - ref_o).abs().max().item():.2e}",
                f"{(s - ref_s).abs().max().item():.2e}",
            )
    gap = (attention(q, k, v)[0] - naive_attention(q, k, v)).abs().max().item()
    table.add_row("attention", "sdpa vs naive", f"{gap:.2e}", "–")
    console.print(table)


if __name__ == "__main__":
    app()
