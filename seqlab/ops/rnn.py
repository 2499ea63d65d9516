"""The classic gated RNNs, LSTM and GRU, with exactly torch.nn.LSTM's and torch.nn.GRU's
equations, optionally as H independent heads. Two forms: recurrent (the reference: a loop over
time in torch ops, float64-capable) and fused (the fast one: PyTorch's own fused RNN kernels,
`torch._VF.lstm` / `torch._VF.gru`, what torch.nn.LSTM / GRU run).

    lstm:  i, f, g, o = σ, σ, tanh, σ of (W_ih x_t + b_ih + W_hh h_{t−1} + b_hh)  (gates in this
           order along the 4N rows)
           c_t = f ⊙ c_{t−1} + i ⊙ g,    h_t = o ⊙ tanh(c_t)
    gru:   r, z = σ(W_i{r,z} x_t + b_i{r,z} + W_h{r,z} h_{t−1} + b_h{r,z})
           n = tanh(W_in x_t + b_in + r ⊙ (W_hn h_{t−1} + b_hn))
           h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}

Shapes (G = 4 gates for LSTM, 3 for GRU; each of H heads is its own recurrence of N units over the
whole input, so the recurrent weight of all heads together is block-diagonal):

    x [B, T, D],  W_ih [H, G·N, D],  W_hh [H, G·N, N],  b_ih, b_hh [H, G·N] (or both None),
    output o [B, T, H, N] (every h_t),  state h [B, H, N] (GRU) or (h, c), each [B, H, N] (LSTM),
    float32 (float64 for float64 inputs); other input dtypes are computed in float32.

With H = 1, W_ih[0], W_hh[0], b_ih[0], b_hh[0] are torch.nn.LSTM(D, N) / GRU(D, N)'s
weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0 (gate order i, f, g, o and r, z, n), o[:, :, 0]
is its batch_first output and state[:, 0] its h_n[0] (c_n[0]). For H heads, `torch_weights` lays
the heads out as one module of hidden size H·N whose recurrent weight is block-diagonal: the
same function (the family's peer "torch.nn", and tests/ops/test_rnn.py).

The fused form runs the heads as H calls of the fused kernel (each reads the whole input), or
where that measured slower (`dense_heads`: narrow recurrences, many heads) as one call with the
block-diagonal weight of `torch_weights`, H times the recurrent products in one call. On
the CPU the float32 LSTM call is oneDNN's fused LSTM (one op); the GRU call and float64 calls run
ATen's native loop (one input-projection matmul, then a matmul and fused pointwise ops per step).
Both take the initial state and return the final one, and both are differentiable (initial state
included). A single step (decode) is cheaper in the recurrent form: the fused call's fixed cost
(oneDNN reorders the weights on every call) is 2-6x a step's.
"""

from __future__ import annotations

import torch

from seqlab.ops._common import check_shape, check_tensor, compute_dtype, outside_autocast
from seqlab.ops.registry import Flops, OpFamily, register_family

GATES = {"lstm": 4, "gru": 3}
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _check(cell, x, W_ih, W_hh, b_ih, b_hh, initial_state):
    """Check the cell, shapes and devices; return (B, T, D, H, N)."""
    if cell not in GATES:
        raise ValueError(f"cell must be one of {', '.join(map(repr, GATES))}, got {cell!r}")
    G = GATES[cell]
    for name, t in (("x", x), ("W_ih", W_ih), ("W_hh", W_hh)):
        check_tensor(name, t)
    if x.dim() != 3:
        raise ValueError(f"x must have rank 3 [B, T, D], got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if W_hh.dim() != 3:
        raise ValueError(f"W_hh must have rank 3 [H, {G}·N, N], got shape {tuple(W_hh.shape)}")
    H, N = W_hh.shape[0], W_hh.shape[2]
    if W_hh.shape[1] != G * N:
        raise ValueError(
            f"W_hh has shape {tuple(W_hh.shape)}, expected [H, {G}·N, N] = [{H}, {G * N}, {N}] "
            f"for a {cell} ({G} gates of N = {N} units per head)"
        )
    check_shape("W_ih", W_ih, "HGD", (H, G * N, D))
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be given or both be None (no biases)")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            check_tensor(name, b)
            check_shape(name, b, "HG", (H, G * N))
    states = ()
    if initial_state is not None:
        if cell == "lstm":
            if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
                raise TypeError(
                    "an LSTM's initial_state must be a pair (h, c) of [B, H, N] tensors, got "
                    f"{type(initial_state).__name__}"
                )
            states = (("initial_state[0] (h)", initial_state[0]),)
            states += (("initial_state[1] (c)", initial_state[1]),)
        else:
            states = (("initial_state", initial_state),)
        for name, s in states:
            check_tensor(name, s)
            check_shape(name, s, "BHN", (B, H, N))
    tensors = [x, W_ih, W_hh, b_ih, b_hh, *(s for _, s in states)]
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if T == 0:
        raise ValueError("the sequence is empty: x has T = 0 time steps")
    if H == 0 or N == 0:
        raise ValueError(f"W_hh has shape {tuple(W_hh.shape)}: a recurrence needs H, N ≥ 1")
    return B, T, D, H, N


def _prepare(cell, x, W_ih, W_hh, b_ih, b_hh, initial_state):
    """Check; return the inputs in the compute dtype and the initial (h, c) as [B, H, N]
    (zeros where not given; c is None for a GRU)."""
    B, T, D, H, N = _check(cell, x, W_ih, W_hh, b_ih, b_hh, initial_state)
    dt = compute_dtype(x.dtype)
    x, W_ih, W_hh = (t.to(dt) for t in (x, W_ih, W_hh))
    b_ih, b_hh = (None if b is None else b.to(dt) for b in (b_ih, b_hh))
    if initial_state is None:
        h = x.new_zeros(B, H, N)
        c = h if cell == "lstm" else None
    elif cell == "lstm":
        h, c = (s.to(dt) for s in initial_state)
    else:
        h, c = initial_state.to(dt), None
    return x, W_ih, W_hh, b_ih, b_hh, h, c


def _finish(cell, o, h, c, x, output_final_state):
    state = None
    if output_final_state:
        state = (h, c) if cell == "lstm" else h
    return o.to(x.dtype), state


def _recurrent(cell, x, W_ih, W_hh, b_ih, b_hh, h, c):
    """Loop over time, all heads at once: the input projection of every step in one product,
    then per step one batched product over heads [H, B, N] @ [H, N, G·N] and the gate update.
    Returns o [B, T, H, N] and the final h, c [B, H, N] (c None for a GRU)."""
    B, T, D = x.shape
    H, GN, N = W_hh.shape
    xw = (x.reshape(B * T, D) @ W_ih.reshape(H * GN, D).T).view(B, T, H, GN)
    if b_ih is not None:
        xw = xw + b_ih
    # [T, H, B, G·N], split once: indexing xw[t] per step makes backward add a full-size zero
    # gradient per step (quadratic in T)
    steps = xw.permute(1, 2, 0, 3).unbind(0)
    Wt = W_hh.transpose(1, 2)  # [H, N, G·N]
    h = h.transpose(0, 1)  # [H, B, N]
    c = None if c is None else c.transpose(0, 1)
    outs = []
    for t in range(T):
        hw = torch.bmm(h, Wt)
        if b_hh is not None:
            hw = hw + b_hh[:, None]
        if cell == "lstm":
            i, f, g, o = (steps[t] + hw).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            xr, xz, xn = steps[t].chunk(3, dim=-1)
            hr, hz, hn = hw.chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = n + z * (h - n)  # (1 − z) n + z h, as ATen writes it
        outs.append(h)
    o = torch.stack(outs).permute(2, 0, 1, 3)  # [T, H, B, N] → [B, T, H, N]
    return o, h.transpose(0, 1), None if c is None else c.transpose(0, 1)


HEADS = ("auto", "loop", "dense")


def dense_heads(cell: str, H: int, N: int) -> bool:
    """Whether the fused form's "auto" runs H > 1 heads as one dense call (block-diagonal
    recurrent weight, H times the recurrent products) rather than one call per head.

    Measured on the CPU (fwd+bwd, one thread, d_model 256-1024, B 1 and 16): per-head calls
    cost a fixed amount per step and call (most for the GRU, whose ATen loop dispatches a
    handful of ops per step), the dense call H times the recurrent products; the dense call won
    where the recurrent width H·N ≤ 512 with H ≥ 8 (both cells) or H·N ≤ 256 (GRU, any H > 1),
    and lost everywhere else (3-4x at H·N = 1024). Both compute the same function."""
    return H > 1 and H * N <= 512 and (H >= 8 or (cell == "gru" and H * N <= 256))


def _call(cell, x, h, c, weights, bias):
    """One torch._VF call (1 layer, batch_first, no dropout) from h, c [1, B, N]."""
    train = torch.is_grad_enabled()  # dropout is 0: `train` only keeps what backward needs
    if cell == "lstm":
        return torch._VF.lstm(x, (h, c), weights, bias, 1, 0.0, train, False, True)
    o, hn = torch._VF.gru(x, h, weights, bias, 1, 0.0, train, False, True)
    return o, hn, None


def _fused(cell, x, W_ih, W_hh, b_ih, b_hh, h, c, heads):
    """The fused kernel on the whole input: one call per head ("loop"), or one call of hidden
    size H·N with the heads laid out by `torch_weights` ("dense"); the same returns as
    `_recurrent`."""
    B, T, _ = x.shape
    H, _, N = W_hh.shape
    bias = b_ih is not None
    if heads == "auto":
        heads = "dense" if dense_heads(cell, H, N) else "loop"
    if heads == "dense" or H == 1:
        weights = list(torch_weights(cell, W_ih, W_hh, b_ih, b_hh).values())
        c0 = None if c is None else c.reshape(1, B, H * N)
        o, hn, cn = _call(cell, x, h.reshape(1, B, H * N), c0, weights, bias)
        cn = None if cn is None else cn.view(B, H, N)
        return o.view(B, T, H, N), hn.view(B, H, N), cn
    outs, hs, cs = [], [], []
    for k in range(H):
        weights = [W_ih[k], W_hh[k], *((b_ih[k], b_hh[k]) if bias else ())]
        c0 = None if c is None else c[:, k].unsqueeze(0)
        o, hk, ck = _call(cell, x, h[:, k].unsqueeze(0), c0, weights, bias)
        outs.append(o)
        hs.append(hk[0])
        if ck is not None:
            cs.append(ck[0])
    o = torch.stack(outs, dim=2)
    return o, torch.stack(hs, dim=1), torch.stack(cs, dim=1) if cs else None


@outside_autocast
def recurrent_rnn(
    x, W_ih, W_hh, b_ih=None, b_hh=None, cell="lstm", initial_state=None, output_final_state=False
):
    """Reference form: one step per token in torch ops (every head at once). Also the decode
    step (T = 1). Returns (o [B, T, H, N], final state or None)."""
    xf, *w, h, c = _prepare(cell, x, W_ih, W_hh, b_ih, b_hh, initial_state)
    o, h, c = _recurrent(cell, xf, *w, h, c)
    return _finish(cell, o, h, c, x, output_final_state)


@outside_autocast
def fused_rnn(
    x,
    W_ih,
    W_hh,
    b_ih=None,
    b_hh=None,
    cell="lstm",
    initial_state=None,
    output_final_state=False,
    heads="auto",
):
    """Fast form (prefill, training): PyTorch's fused LSTM / GRU kernel, H > 1 heads as one
    call per head (`heads="loop"`) or one block-diagonal call ("dense"); "auto" picks by
    `dense_heads`. Returns (o [B, T, H, N], final state or None)."""
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {', '.join(map(repr, HEADS))}, got {heads!r}")
    xf, *w, h, c = _prepare(cell, x, W_ih, W_hh, b_ih, b_hh, initial_state)
    o, h, c = _fused(cell, xf, *w, h, c, heads)
    return _finish(cell, o, h, c, x, output_final_state)


@outside_autocast
def rnn(*args, form="fused", **kwargs):
    """The LSTM / GRU (keyword `cell`) in the named form ("fused" or "recurrent")."""
    if form == "fused":
        return fused_rnn(*args, **kwargs)
    if form == "recurrent":
        return recurrent_rnn(*args, **kwargs)
    raise ValueError(f"form must be one of 'recurrent', 'fused', got {form!r}")


def torch_weights(cell, W_ih, W_hh, b_ih=None, b_hh=None) -> dict[str, torch.Tensor]:
    """The H heads as the weights of one torch.nn.LSTM / GRU of hidden size H·N (same dtype,
    differentiable): gate blocks of all heads side by side, the recurrent weight block-diagonal.

    Unit n of head k is the module's unit k·N + n; gate j of it is row j·H·N + k·N + n.
    Returns {"weight_ih_l0": [G·H·N, D], "weight_hh_l0": [G·H·N, H·N], and the biases [G·H·N]}.
    """
    G = GATES[cell]
    H, _, N = W_hh.shape
    D = W_ih.shape[-1]
    if H == 1:
        w_hh = W_hh[0]
    else:  # [G, H, N, H, N] with zero blocks off the head diagonal (exact: products by 1 and 0)
        eye = torch.eye(H, dtype=W_hh.dtype, device=W_hh.device)
        w_hh = torch.einsum("kgnm,kl->gknlm", W_hh.view(H, G, N, N), eye)
    out = {
        "weight_ih_l0": W_ih.view(H, G, N, D).transpose(0, 1).reshape(G * H * N, D),
        "weight_hh_l0": w_hh.reshape(G * H * N, H * N),
    }
    if b_ih is not None:
        out["bias_ih_l0"] = b_ih.view(H, G, N).transpose(0, 1).reshape(G * H * N)
        out["bias_hh_l0"] = b_hh.view(H, G, N).transpose(0, 1).reshape(G * H * N)
    return out


def _torch_nn_peer():
    """torch.nn.LSTM / torch.nn.GRU (1 layer, batch_first, hidden H·N, block-diagonal
    recurrent weight from `torch_weights`): the same function as one dense module."""
    from torch.func import functional_call

    modules: dict[tuple, torch.nn.Module] = {}

    def peer(x, W_ih, W_hh, b_ih=None, b_hh=None, cell="lstm"):
        B, T, D = x.shape
        H, _, N = W_hh.shape
        key = (cell, D, H * N, b_ih is not None, x.dtype, x.device)
        if key not in modules:
            cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
            modules[key] = cls(
                D, H * N, bias=key[3], batch_first=True, dtype=x.dtype, device=x.device
            )
        weights = torch_weights(cell, W_ih, W_hh, b_ih, b_hh)
        o, _ = functional_call(modules[key], weights, (x,))
        return o.view(B, T, H, N)

    return peer


def rnn_flops(variant: str, form: str, T: int, H: int = 1, *, D: int, N: int) -> Flops:
    """One sequence of T tokens, H heads of N units each over an input of width D.

    The products: per token and head the input projection 2·G·N·D and the recurrent one
    2·G·N·N (H·N·N where the fused form runs the heads as one dense call, `dense_heads`).
    Elementwise, per token and head: LSTM 21·N (the gate sum 4N, two biases 8N, three
    sigmoids and two tanh 5N, the c and h updates 4N), GRU 16N (r and z sums 2N, biases 6N,
    r ⊙ hn and its sum 2N, two sigmoids and a tanh 3N, the h update 3N).

    matmul is what torch's FlopCounterMode sees on the CPU in float32 (every dtype but float64
    computes in float32): the products in the recurrent form and in the fused GRU (ATen's native
    loop of addmm); none in the fused LSTM, which is one oneDNN op the counter has no formula for,
    so its products are counted in `other` there. (A float64 fused LSTM takes ATen's native
    loop, and the counter sees its products.)
    """
    G = GATES[variant]
    products = 2 * G * N * (D + N) * T * H
    if form == "fused" and dense_heads(variant, H, N):  # zero blocks of the dense call too
        products += 2 * G * N * (H - 1) * N * T * H
    pointwise = (21 if variant == "lstm" else 16) * N * T * H
    if form not in ("recurrent", "fused"):
        raise ValueError(f"rnn has no form {form!r}")
    if form == "fused" and variant == "lstm":
        return Flops(0, products + pointwise)
    return Flops(products, pointwise)


def rnn_state_bytes(variant: str, T: int = 0, H: int = 1, *, N: int, **_) -> int:
    """The final state of one sequence, float32: h [H, N] (GRU), h and c (LSTM)."""
    return (2 if variant == "lstm" else 1) * H * N * 4


def rnn_workspace_bytes(variant: str, form: str, T: int, H: int, grad: bool, *, N: int, **_):
    """The input projection of every step, G·N per token and head (float32); with `grad`
    also the gates and states of every step kept for backward (2G + 2 per token and head, a
    generous bound for both forms)."""
    G = GATES[variant]
    return 4 * T * H * N * (G + (2 * G + 2 if grad else 0))


def make_rnn_inputs(
    variant: str,
    B: int,
    T: int,
    H: int = 1,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    *,
    D: int = 64,
    N: int = 64,
) -> dict:
    """torch.nn.LSTM / GRU's init: every weight and bias uniform in ±N^-1/2; for the LSTM a
    forget-gate bias of +3 on every other unit (long memory). x standard normal, each token
    scaled by 0.5, 1 or 4 at random: the ×4 tokens saturate gates (strong gates)."""
    G = GATES[variant]
    bound = N**-0.5

    def uniform(*shape):
        u = torch.rand(*shape, generator=generator, dtype=torch.float64)
        return (2 * u - 1) * bound

    W_ih, W_hh = uniform(H, G * N, D), uniform(H, G * N, N)
    b_ih, b_hh = uniform(H, G * N), uniform(H, G * N)
    if variant == "lstm":
        b_ih[:, N : 2 * N : 2] += 3.0
    scale = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    pick = torch.randint(0, 3, (B, T, 1), generator=generator)
    x = torch.randn(B, T, D, generator=generator, dtype=torch.float64) * scale[pick]
    tensors = {"x": x, "W_ih": W_ih, "W_hh": W_hh, "b_ih": b_ih, "b_hh": b_hh}
    return {**{n: t.to(dtype) for n, t in tensors.items()}, "cell": variant}


register_family(
    OpFamily(
        name="rnn",
        forms={"recurrent": recurrent_rnn, "fused": fused_rnn},
        reference="recurrent",
        fast="fused",
        variants=("lstm", "gru"),
        make_inputs=make_rnn_inputs,
        flops=rnn_flops,
        state_bytes=rnn_state_bytes,
        workspace_bytes=rnn_workspace_bytes,
        dims={"D": 64, "N": 64},
        peers={"torch.nn": _torch_nn_peer},
        # the fused form is torch's own kernel, held to torch.nn's modules; no chunk form exists
        targets={"peer:torch.nn": 1 / 1.2},
        doc="LSTM and GRU (torch.nn's equations), H heads with block-diagonal recurrence",
    )
)
