"""The issue's scientific checks that fit a CPU test run (under a minute each).

- MQAR: attention reaches ≥ 99 % accuracy.
- Parity: Gated DeltaNet with allow_neg_eigval fits the training lengths (3–40) and generalises to
  41–128 (3.2×); the same model without it stays near chance on the longer sequences.

The third check, recall falling with the number of pairs at a fixed recurrent state, is a README
run, not a test: at a CPU budget whether a small-state model leaves the plateau depends on the seed
and even on round-off (README, "The scientific checks").
"""

from __future__ import annotations

from seqlab.model.lm import ModelConfig
from seqlab.tasks import Examples, build_task, evaluate_slices
from seqlab.train.trainer import TrainConfig, TrainResult, train

MQAR = dict(
    vocab_size=64,
    train_mix=((32, 2, 2000), (32, 4, 2000), (32, 8, 2000)),
    test_mix=((32, 2, 200), (32, 4, 200), (32, 8, 200)),
)


def fit(
    task, pattern: str, d_model: int, n_layers: int, steps: int, init_std: float = 0.02, **options
) -> TrainResult:
    model = ModelConfig(
        vocab_size=task.vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        pattern=pattern,
        channel=None,
        init_std=init_std,
    )
    base = dict(
        steps=steps,
        batch_size=32,
        lr=3e-3,
        warmup_steps=min(100, steps // 10),
        weight_decay=0.0,
        progress=False,
    )
    return train(model, task, TrainConfig.make(**{**base, **options}))


def head(examples: Examples, n: int) -> Examples:
    return Examples(
        examples.inputs[:n],
        examples.targets[:n],
        examples.lengths[:n],
        examples.slices[:n],
        examples.slice_names,
    )


def test_attention_solves_mqar():
    # A 3000-step schedule, stopped at 99 %. With init_std 0.07 (about PyTorch's default
    # Linear init at this width) seeds 0–3 get there in 400–500 steps; with the model default
    # 0.02 on every layer, seed 0 is still at 27.7 % after 3000 steps (README, "The scientific
    # checks").
    task = build_task("mqar", **MQAR)
    result = fit(task, "attn(num_heads=2)", 64, 2, 3000, 0.07, eval_every=100, target_accuracy=0.99)
    assert result.final["all"] >= 0.99, result.history[-1]


def test_parity_needs_negative_eigenvalues():
    task = build_task("parity", preset="cpu")  # trains on lengths 3–40, tests on 41–128
    # A 1500-step schedule, stopped at 99.5 %: seeds 0–3 get there in 400–600 steps. With an
    # 800-step schedule seed 1 stays at chance (README, "The scientific checks").
    options = dict(eval_every=100, target_accuracy=0.995)
    neg = fit(task, "gdn(allow_neg_eigval=True)", 32, 1, 1500, **options)
    assert neg.stop_reason == "target_accuracy", neg.history[-1]
    assert min(neg.final.values()) >= 0.99, neg.final  # every length bin, up to 3.2× longer

    def train_accuracy(result: TrainResult) -> float:
        model = result.model.eval()
        examples = head(task.dataset("train"), 1024)
        return evaluate_slices(lambda x: model(x).logits.argmax(-1), examples, 256)["all"]

    assert train_accuracy(neg) >= 0.99

    # The same model and training with β ∈ (0, 1), for all 1500 steps: near chance (0.5) on the
    # longer sequences.
    pos = fit(task, "gdn", 32, 1, 1500, **options)
    assert pos.step == 1500 and pos.best["all"] < 0.65, pos.history
    assert train_accuracy(pos) < 0.9
