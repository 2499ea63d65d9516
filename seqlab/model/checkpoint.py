"""Model checkpoints in safetensors: weights plus the config, written atomically, verified on load.

    save_checkpoint(model, "run/model.safetensors")
    model = load_checkpoint("run/model.safetensors")             # rebuilt from the stored config
    load_checkpoint("run/model.safetensors", config=my_config)    # fails naming any mismatch

The file is written to a temporary name in the same folder, flushed to disk, then renamed over
the target, so a crash leaves the old file or the new one, never half of one. A SHA-256 of the
tensors is stored in the metadata, so a truncated or corrupted file is detected, not half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from seqlab.files import write_atomic
from seqlab.model.lm import CausalLM, ModelConfig

FORMAT = "seqlab-causal-lm-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt, truncated, or not matching the config."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _weights(model: CausalLM) -> dict[str, torch.Tensor]:
    # state_dict() lists a tied weight under both names; safetensors stores each storage once.
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("head.weight", None)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_checkpoint(model: CausalLM, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _weights(model)
    metadata = {
        "format": FORMAT,
        "config": model.config.model_dump_json(),
        "sha256": _digest(tensors),
    }
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _metadata(path: str | os.PathLike) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file: truncated or corrupt ({e})"
        ) from None
    if metadata.get("format") != FORMAT:
        fmt = metadata.get("format")
        raise CheckpointError(f"{path}: not a seqlab checkpoint (format {fmt!r})")
    return metadata


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The config stored in a checkpoint, without loading its weights."""
    return ModelConfig.model_validate(json.loads(_metadata(path)["config"]))


def load_checkpoint(
    path: str | os.PathLike, config: ModelConfig | None = None, map_location: str = "cpu"
) -> CausalLM:
    """Rebuild the model stored at `path`; with `config`, first check that the two agree."""
    metadata = _metadata(path)
    stored = ModelConfig.model_validate(json.loads(metadata["config"]))
    if config is not None and config != stored:
        diffs = [
            f"{k}: checkpoint has {getattr(stored, k)!r}, config has {getattr(config, k)!r}"
            for k in ModelConfig.model_fields
            if getattr(stored, k) != getattr(config, k)
        ]
        raise CheckpointError(f"{path} does not match the given config: " + "; ".join(diffs))
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({e})") from None
    if _digest(tensors) != metadata.get("sha256"):
        raise CheckpointError(f"{path}: corrupt checkpoint (tensor checksum does not match)")
    model = CausalLM(stored)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (stored.tie_embeddings and m == "head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the model built from its config "
            f"(missing {missing}, unexpected {unexpected})"
        )
    return model.to(map_location)
