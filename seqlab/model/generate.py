"""Generation (prefill with the chunk form, then recurrent decode steps) and streaming.

ids = generate(model, prompt, max_new_tokens=50, temperature=0.8, top_p=0.9, seed=0)
for logits in stream(model, iter(tokens), block_size=256): ...   # constant memory
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator

import torch

from seqlab.model.lm import CausalLM


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0 or temperature == float("inf"):  # NaN fails the comparison
        raise ValueError(f"temperature must be finite and ≥ 0, got {temperature}")
    bad_type = isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
    if top_k is not None and (bad_type or top_k < 1):
        raise ValueError(f"top_k must be an int ≥ 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]. temperature 0 is greedy."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    # A temperature so small that logits / temperature overflows acts as its limit, greedy: such
    # rows keep only their argmax (per row, with no host read; -inf logits stay masked).
    overflow = (scaled.isinf() & logits.isfinite()).any(-1, keepdim=True)
    greedy = torch.full_like(scaled, float("-inf")).scatter(-1, logits.argmax(-1, keepdim=True), 0)
    logits = torch.where(overflow, greedy, scaled)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        # The most likely token is always kept (top_p may round to 0 in float32).
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: CausalLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """prompt [B, T] → [B, T + max_new_tokens]; seeded sampling is reproducible."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise ValueError(f"max_new_tokens must be an int ≥ 0, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)
    if seed is not None and (
        isinstance(seed, bool)
        or not isinstance(seed, numbers.Integral)
        or not -(2**63) <= seed < 2**64  # what torch.Generator.manual_seed takes
    ):
        raise ValueError(f"seed must be an int in [-2^63, 2^64) or None, got {seed!r}")
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [B, T] with T ≥ 1, got shape {tuple(prompt.shape)}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(int(seed))
    out = model(prompt)
    tokens = [prompt]
    for _ in range(int(max_new_tokens)):
        nxt = sample(out.logits[:, -1], temperature, top_k, top_p, generator)[:, None]
        tokens.append(nxt)
        out = model(nxt, state=out.state, check_ids=False)  # sampled: in range, no host read
    return torch.cat(tokens, 1)


class Stream:
    """Consume an unbounded iterator of token ids; yield next-token logits [vocab] per token.

    Tokens are gathered into blocks of `block_size` and run with the chunk form, or one at a time
    with the recurrent step (block_size 1); `state` carries the model's state between blocks, so
    for models of recurrent mixers only, memory stays constant however long the stream runs.
    """

    def __init__(self, model: CausalLM, block_size: int = 1):
        if block_size < 1:
            raise ValueError(f"block_size must be ≥ 1, got {block_size}")
        self.model = model
        self.block_size = block_size
        self.state = model.init_state(1)
        self.device = next(model.parameters()).device

    @property
    def state_bytes(self) -> int:
        return CausalLM.state_bytes(self.state)

    @torch.no_grad()
    def _run(self, ids: list[int]) -> torch.Tensor:
        vocab = self.model.config.vocab_size
        if not all(0 <= i < vocab for i in ids):  # checked here, on the host, not on the device
            raise ValueError(f"token ids must lie in [0, {vocab}), got {min(ids)} .. {max(ids)}")
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(x, self.state, check_ids=False)
        self.state = out.state
        return out.logits[0]

    def __call__(self, tokens: Iterable[int]) -> Iterator[torch.Tensor]:
        block: list[int] = []
        for tok in tokens:
            block.append(int(tok))
            if len(block) == self.block_size:
                yield from self._run(block)
                block = []
        if block:
            yield from self._run(block)


def stream(model: CausalLM, tokens: Iterable[int], block_size: int = 1) -> Iterator[torch.Tensor]:
    """Next-token logits for each token of `tokens`, carrying the state (see `Stream`)."""
    return Stream(model, block_size)(tokens)
