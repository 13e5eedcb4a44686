"""Checkpoint files: one ``model.pt`` per checkpoint directory holding the model's state, the
optimizer's, the epoch, the stage and the resolved config (so eval and Serve can rebuild it).
An exported model folder (``trustlab.platform.runs``) may hold ``model.safetensors`` instead, with
the config in ``config.yaml`` beside it; ``load_state`` reads both the same way."""
from __future__ import annotations

import contextlib
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


SAFETENSORS_FILE = "model.safetensors"


def _safetensors_state(data: bytes, config_yaml: bytes) -> dict:
    """An exported ``model.safetensors`` + its ``config.yaml`` -> the state ``load_state`` returns."""
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:  # metadata is read from a file
        f.write(data)
        f.flush()
        with safe_open(f.name, framework="pt") as st:
            meta = st.metadata() or {}
    epoch = meta.get("epoch")
    return {"model": load(data), "cfg": yaml.safe_load(config_yaml), "stage": meta.get("stage"),
            "epoch": int(epoch) if epoch and epoch.isdigit() else None}


def load_state(uri: str, endpoint: str | None = None) -> dict:
    """Load a checkpoint from a ``model.pt`` file or a directory holding one (or an exported
    folder's ``model.safetensors`` + ``config.yaml``), local or ``s3://``."""
    uri = str(uri)
    if storage.is_s3(uri):
        import io

        if not uri.endswith((".pt", ".safetensors")):
            base = uri.rstrip("/")
            fs, path = storage.resolve(base + "/" + SAFETENSORS_FILE, endpoint)
            import pyarrow.fs as pafs

            uri = base + "/" + (SAFETENSORS_FILE if fs.get_file_info(path).type == pafs.FileType.File else CKPT_FILE)
        if uri.endswith(".safetensors"):
            return _safetensors_state(storage.read_bytes(uri, endpoint),
                                      storage.read_bytes(uri.rsplit("/", 1)[0] + "/config.yaml", endpoint))
        return torch.load(io.BytesIO(storage.read_bytes(uri, endpoint)), map_location="cpu", weights_only=False)
    if os.path.isdir(uri):
        pt, st = os.path.join(uri, CKPT_FILE), os.path.join(uri, SAFETENSORS_FILE)
        uri = st if os.path.isfile(st) and not os.path.isfile(pt) else pt
    if uri.endswith(".safetensors"):
        with open(uri, "rb") as f, open(os.path.join(os.path.dirname(uri), "config.yaml"), "rb") as c:
            return _safetensors_state(f.read(), c.read())
    return torch.load(uri, map_location="cpu", weights_only=False)


def load_ray_checkpoint(ckpt) -> dict:
    """Load the state from a ``ray.train.Checkpoint`` (local or remote storage)."""
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, CKPT_FILE), map_location="cpu", weights_only=False)


def temp_dir() -> tempfile.TemporaryDirectory:
    """A staging folder for a checkpoint, removed when its ``with`` block ends (Ray has persisted a
    reported checkpoint by then; left in place they filled /tmp by ~60 GB in a day of runs)."""
    return tempfile.TemporaryDirectory(prefix="trustlab-ckpt-", ignore_cleanup_errors=True)


@contextlib.contextmanager
def staged_state(state: dict | None):
    """``state`` (a model state dict) saved as an ``init`` checkpoint in a staging folder for the
    ``with`` block, which yields the folder (removed after); yields None without a state."""
    if state is None:
        yield None
        return
    with temp_dir() as d:
        save_state(d, model=state, stage="init", epoch=0)
        yield d
