"""`causal_conv_fft` (O(T log T)) against `causal_conv_direct` (term by term), float64, with
gradients: kernels shared or per batch, shorter or longer than the input, odd lengths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.ops._common import _fft_size, causal_conv_direct, causal_conv_fft


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 40),
    L=st.integers(1, 50),
    D=st.integers(1, 4),
    per_batch=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fft_equals_direct_forward_and_backward(B, T, L, D, per_batch, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k_shape = (B, L, D) if per_batch else (L, D)
    k = torch.randn(*k_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    a, b = causal_conv_fft(u, k), causal_conv_direct(u, k)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    w = torch.randn(a.shape, generator=gen, dtype=torch.float64)
    ga = torch.autograd.grad((a * w).sum(), (u, k))
    gb = torch.autograd.grad((b * w).sum(), (u, k))
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-11)


def test_output_at_t_depends_only_on_inputs_up_to_t():
    u = torch.randn(1, 16, 2, dtype=torch.float64)
    k = torch.randn(16, 2, dtype=torch.float64)
    v = u.clone()
    v[:, 9:] = torch.randn(1, 7, 2, dtype=torch.float64)
    torch.testing.assert_close(causal_conv_fft(u, k)[:, :9], causal_conv_fft(v, k)[:, :9])


@pytest.mark.parametrize("n", [1, 7, 11, 97, 1000, 4097])
def test_fft_size_is_the_next_5_smooth_number(n):
    m = _fft_size(n)
    assert m >= n
    r = m
    for p in (2, 3, 5):
        while r % p == 0:
            r //= p
    assert r == 1
    assert all(_fft_size(j) > j for j in range(n, m))  # none smaller is 5-smooth


@pytest.mark.parametrize("shape", [(0, 7, 3), (2, 0, 3)])
def test_empty_batch_or_length_gives_an_empty_result(shape):
    u = torch.zeros(shape)
    y = causal_conv_fft(u, torch.randn(7, 3))
    assert y.shape == shape and y.dtype == torch.float32
