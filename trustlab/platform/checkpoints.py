"""Checkpoint files: one ``model.pt`` per checkpoint directory holding the model's state, the
optimizer's, the epoch, the stage and the resolved config (so eval and Serve can rebuild it)."""
from __future__ import annotations

import os
import tempfile

import torch

from trustlab.platform import storage

CKPT_FILE = "model.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_state(path_dir: str, **state) -> str:
    os.makedirs(path_dir, exist_ok=True)
    p = os.path.join(path_dir, CKPT_FILE)
    torch.save(state, p)
    return p


def load_state(uri: str, endpoint: str | None = None) -> dict:
    """Load a checkpoint from a ``model.pt`` file or a directory holding one, local or ``s3://``."""
    if storage.is_s3(uri):
        if not uri.endswith(".pt"):
            uri = uri.rstrip("/") + "/" + CKPT_FILE
        import io

        return torch.load(io.BytesIO(storage.read_bytes(uri, endpoint)), map_location="cpu", weights_only=False)
    if os.path.isdir(uri):
        uri = os.path.join(uri, CKPT_FILE)
    return torch.load(uri, map_location="cpu", weights_only=False)


def load_ray_checkpoint(ckpt) -> dict:
    """Load the state from a ``ray.train.Checkpoint`` (local or remote storage)."""
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, CKPT_FILE), map_location="cpu", weights_only=False)


def temp_dir() -> str:
    return tempfile.mkdtemp(prefix="trustlab-ckpt-")
