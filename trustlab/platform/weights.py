"""Pretrained weights, loudly: one loader for every method.

Sources (a method's ``weights`` / ``pretrained`` / ``checkpoint`` key):

- a local file or an ``s3://`` URI (copied once into ``weights.cache``, then read from there);
- ``timm:<model.tag>``: a timm pretrained tag resolved to a local file under ``weights.timm_dir``
  (``<dir>/<model.tag>/model.safetensors`` or ``pytorch_model.bin``, ``<dir>/<model.tag>.safetensors``
  / ``.pth``, or the Hugging Face cache layout ``models--timm--<model.tag>/snapshots/*/``). Nothing
  is downloaded: a tag without a local file is an error.

Formats: ``.safetensors`` and torch files (a bare state dict, a trustlab ``model.pt`` or a
training checkpoint holding ``state_dict`` / ``model`` / ``model_state_dict`` / ``module``).

Loading (``load_into``): the model family's own conversion runs first (timm: the architecture's
``checkpoint_filter_fn``, the same one ``timm.create_model(..., pretrained=True,
pretrained_cfg_overlay=dict(file=...))`` applies; open_clip: its state-dict conversion and
position-embedding resize). Keys match exactly, else after stripping ``weights.prefixes``
(``module.``, ``model.``, ``backbone.``) from either side. Position embeddings of a ViT trained at
another size are resampled (timm's ``resample_abs_pos_embed``). A classifier whose shape differs
(1000 ImageNet classes into a 1-logit detector) is re-initialised and said so. Strict by default:
every tensor of the module must be matched; with ``weights.strict: false`` a load matching less
than ``weights.min_share`` of the module's tensors still fails. The error lists what was missing.

``provenance(cfg)`` lists every weights source a run's method config names (path, resolved file,
sha256, size); the run writes it into ``config.yaml`` and ``summary.txt``.
"""
from __future__ import annotations

import glob
import hashlib
import importlib
import math
import os
import tempfile
from dataclasses import dataclass, field

import torch

from trustlab.platform import storage

DEFAULTS = {
    "strict": True,                           # every tensor of the module must be matched
    "min_share": 0.9,                         # strict=false: least share of the module's tensors to match
    "prefixes": ["module.", "model.", "backbone."],  # key prefixes stripped when that matches
    "cache": "~/.cache/trustlab/weights",     # local copies of s3:// weights
    "timm_dir": None,                         # folder of timm weights by tag (timm:<model.tag>)
}
#: method-config keys whose string value names a weights source (``provenance`` walks them)
WEIGHT_KEYS = ("weights", "pretrained", "checkpoint", "transformer_weights", "cnn_weights")


class WeightsError(ValueError):
    """Weights that cannot be read or matched to the model (the message lists what)."""


class WeightsNotFound(WeightsError, FileNotFoundError):
    """A weights source with no file behind it (nothing is ever downloaded)."""


@dataclass
class LoadReport:
    source: str
    file: str
    sha256: str
    matched: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)   # (key, checkpoint shape, model shape)
    reinitialised: list = field(default_factory=list)  # classifier tensors of another shape
    resampled: list = field(default_factory=list)
    stripped: list = field(default_factory=list)

    @property
    def n_target(self) -> int:
        return len(self.matched) + len(self.missing) + len(self.mismatched)

    @property
    def share(self) -> float:
        return len(self.matched) / max(1, self.n_target)

    def line(self) -> str:
        extra = []
        if self.stripped:
            extra.append("stripped " + ", ".join(sorted(set(self.stripped))))
        if self.resampled:
            extra.append("resampled " + ", ".join(self.resampled))
        if self.reinitialised:
            extra.append("re-initialised classifier " + ", ".join(self.reinitialised))
        if self.unexpected:
            extra.append(f"{len(self.unexpected)} checkpoint tensors unused")
        return (f"[weights] {self.source}: {len(self.matched)}/{self.n_target} tensors matched "
                f"({100 * self.share:.1f}%), sha256 {self.sha256[:16]}" + ("; " + "; ".join(extra) if extra else ""))


def config(cfg: dict | None) -> dict:
    """The run's ``weights`` block over ``DEFAULTS``."""
    return {**DEFAULTS, **((cfg or {}).get("weights") or {})}


# ----------------------------------------------------------------------------- files
_SHA: dict = {}


def sha256(path: str) -> str:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA[key] = h.hexdigest()
    return _SHA[key]


def _timm_file(tag: str, root: str | None) -> str:
    if not root:
        raise WeightsNotFound(f"timm:{tag}: set weights.timm_dir to the folder holding timm weights (nothing is downloaded)")
    root = os.path.abspath(os.path.expanduser(root))
    pats = [f"{tag}/model.safetensors", f"{tag}/open_clip_model.safetensors", f"{tag}/pytorch_model.bin",
            f"{tag}.safetensors", f"{tag}.pth", f"{tag}.bin", f"timm/{tag}/model.safetensors",
            f"models--timm--{tag}/snapshots/*/model.safetensors", f"models--timm--{tag}/snapshots/*/pytorch_model.bin"]
    for p in pats:
        hits = sorted(glob.glob(os.path.join(root, p)))
        if hits:
            return hits[-1]
    raise WeightsNotFound(f"timm:{tag}: no weights file under {root} (looked for {', '.join(pats[:4])}, ...)")


def local_file(source: str, cfg: dict | None = None) -> str:
    """A local file holding ``source`` (s3:// objects are copied into ``weights.cache`` once)."""
    wc = config(cfg)
    src = str(source)
    if src.startswith("timm:"):
        return _timm_file(src[len("timm:"):], wc.get("timm_dir"))
    if storage.is_s3(src):
        cache = os.path.abspath(os.path.expanduser(wc["cache"]))
        os.makedirs(cache, exist_ok=True)
        dest = os.path.join(cache, hashlib.sha1(src.encode()).hexdigest()[:16] + "-" + os.path.basename(src.rstrip("/")))
        if not os.path.isfile(dest):
            endpoint = ((cfg or {}).get("run") or {}).get("s3_endpoint")
            try:
                data = storage.read_bytes(src, endpoint)
            except OSError as e:
                raise WeightsNotFound(f"cannot read weights {src}: {e}") from None
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=".part-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)  # atomic: workers on one node may fetch at once
        return dest
    path = os.path.abspath(os.path.expanduser(src))
    if os.path.isdir(path):
        for name in ("model.safetensors", "open_clip_model.safetensors", "model.pt", "pytorch_model.bin", "best.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
    if not os.path.isfile(path):
        raise WeightsNotFound(f"weights file not found: {src}")
    return path


_CONTAINERS = ("state_dict", "model", "model_state_dict", "module", "model_ema", "state")


def read_state_dict(path: str) -> dict:
    """``{name: tensor}`` of a safetensors or torch file (containers unwrapped)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a trustlab model.pt holds a config and metrics beside the tensors
        obj = torch.load(path, map_location="cpu", weights_only=False)
    for _ in range(3):
        if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
            inner = next((obj[k] for k in _CONTAINERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(f"{path}: no state dict found (keys: {list(obj)[:8] if isinstance(obj, dict) else type(obj)})")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


# ----------------------------------------------------------------------------- matching
def _strip(key: str, prefixes) -> tuple[str, list]:
    out, cut = key, []
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if p and out.startswith(p):
                out, changed = out[len(p):], True
                cut.append(p)
    return out, cut


def _grid_split(n_tokens: int, other: int) -> tuple[int, int, int] | None:
    """(prefix tokens, old grid side, new grid side) when ``n_tokens`` and ``other`` are a shared
    number of prefix tokens plus square grids."""
    for p in range(0, 9):
        a, b = n_tokens - p, other - p
        if a > 0 and b > 0 and math.isqrt(a) ** 2 == a and math.isqrt(b) ** 2 == b:
            return p, math.isqrt(a), math.isqrt(b)
    return None


def _resample_pos(v: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """A ViT position embedding (1, N, D) or (N, D) resampled to ``shape`` (same D)."""
    from timm.layers import resample_abs_pos_embed

    if v.shape[-1] != shape[-1] or v.dim() != len(shape) or v.dim() not in (2, 3):
        return None
    split = _grid_split(v.shape[-2], shape[-2])
    if split is None:
        return None
    p, _, g = split
    x = v if v.dim() == 3 else v[None]
    y = resample_abs_pos_embed(x.float(), new_size=(g, g), num_prefix_tokens=p, verbose=False).to(v.dtype)
    return y if v.dim() == 3 else y[0]


def match_state_dict(sd: dict, target: dict, prefixes=(), classifier: str | None = None,
                     include=None) -> tuple[dict, LoadReport]:
    """Map checkpoint tensors ``sd`` onto the module's ``target`` state dict; returns the dict to
    load and a report (source/file/sha filled in by the caller)."""
    rep = LoadReport("", "", "")
    keys = [k for k in target if include is None or k.startswith(tuple(include))]
    left = dict(sd)
    out: dict = {}
    norm_ck: dict = {}
    for k in sd:
        n, cut = _strip(k, prefixes)
        norm_ck.setdefault(n, []).append((k, cut))
    pending = []
    for k in keys:
        if k in left:
            out[k] = left.pop(k)
        else:
            pending.append(k)
    for k in pending:
        n, _ = _strip(k, prefixes)
        cands = [(ck, cut) for ck, cut in norm_ck.get(n, []) if ck in left]
        if len(cands) == 1:
            ck, cut = cands[0]
            out[k] = left.pop(ck)
            rep.stripped.extend(cut)
        else:
            rep.missing.append(k)
    load = {}
    for k, v in out.items():
        want = target[k].shape
        if v.shape == want:
            load[k] = v
            rep.matched.append(k)
            continue
        if k.endswith(("pos_embed", "positional_embedding")) and k != "positional_embedding":
            r = _resample_pos(v, want)
            if r is not None:
                load[k] = r
                rep.matched.append(k)
                rep.resampled.append(f"{k} {tuple(v.shape)}->{tuple(want)}")
                continue
        if classifier and (k == classifier or k.startswith(classifier + ".")):
            rep.reinitialised.append(k)
            continue
        rep.mismatched.append((k, tuple(v.shape), tuple(want)))
    rep.unexpected = sorted(left)
    return load, rep


def _fail(rep: LoadReport, what: str, wc: dict) -> None:
    lines = [f"weights {rep.source} ({rep.file}) do not fit {what}: {len(rep.matched)}/{rep.n_target} tensors "
             f"matched ({100 * rep.share:.1f}%; "
             + (f"strict: every tensor must match" if wc["strict"] else f"need >= {100 * float(wc['min_share']):.0f}%") + ")"]
    if rep.missing:
        lines.append(f"missing from the checkpoint ({len(rep.missing)}): " + ", ".join(rep.missing[:40])
                     + (" ..." if len(rep.missing) > 40 else ""))
    if rep.mismatched:
        lines.append(f"shape differs ({len(rep.mismatched)}): " + ", ".join(
            f"{k} {a} vs model {b}" for k, a, b in rep.mismatched[:20]))
    if rep.unexpected:
        lines.append(f"checkpoint keys not in the model ({len(rep.unexpected)}): " + ", ".join(rep.unexpected[:20])
                     + (" ..." if len(rep.unexpected) > 20 else ""))
    lines.append(f"key prefixes tried: {wc['prefixes']} (weights.prefixes); weights.strict=false with "
                 "weights.min_share accepts a partial load")
    raise WeightsError("\n".join(lines))


def load_into(module: torch.nn.Module, source: str, cfg: dict | None = None, *, filter_fn=None,
              classifier: str | None = None, include=None, what: str | None = None,
              strict: bool | None = None) -> LoadReport:
    """Load weights ``source`` into ``module`` (see the module docstring); returns the report,
    raises ``WeightsError`` listing what is missing when the load falls short. ``include``: only
    the module's keys with these prefixes are the target (e.g. a Transformer inside a model)."""
    wc = config(cfg)
    if strict is not None:
        wc["strict"] = bool(strict)
    path = local_file(source, cfg)
    try:
        sd = read_state_dict(path)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"cannot read weights {source} ({path}): {type(e).__name__}: {e}") from None
    if filter_fn is not None:
        sd = filter_fn(sd, module)
    target = module.state_dict()
    load, rep = match_state_dict(sd, target, wc["prefixes"], classifier, include)
    rep.source, rep.file, rep.sha256 = str(source), path, sha256(path)
    bad = bool(rep.missing or rep.mismatched) if wc["strict"] else rep.share < float(wc["min_share"])
    if bad or not rep.matched:
        _fail(rep, what or type(module).__name__, wc)
    module.load_state_dict(load, strict=False)
    print(rep.line(), flush=True)
    return rep


# ----------------------------------------------------------------------------- model families
def timm_filter(arch: str):
    """The timm architecture's own ``checkpoint_filter_fn`` (converts original-format weights,
    resamples ViT position/patch embeddings), or None."""
    import timm.models._registry as reg

    name = reg.get_arch_name(arch)
    mod = reg._model_to_module.get(name)
    fn = getattr(importlib.import_module(f"timm.models.{mod}"), "checkpoint_filter_fn", None) if mod else None
    if fn is None:
        return None

    def apply(sd, model):
        try:
            return fn(sd, model)
        except Exception:  # noqa: BLE001 - e.g. a features_only wrapper; the strict match below stays loud
            return sd

    return apply


def create_timm(name: str, source: str | None = None, cfg: dict | None = None, what: str | None = None, **kwargs):
    """``timm.create_model(name, pretrained=False, **kwargs)`` with weights ``source`` loaded
    loudly (``load_into``); the model's classifier is re-initialised when its size differs."""
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs)
    if source:
        pc = getattr(model, "pretrained_cfg", None) or {}
        clf = pc.get("classifier") if not kwargs.get("features_only") else None
        load_into(model, source, cfg, filter_fn=timm_filter(name), classifier=clf if isinstance(clf, str) else None,
                  what=what or f"timm {name}")
    return model


def _open_clip_filter(sd, model):
    from open_clip import factory as ocf

    if hasattr(ocf, "convert_state_dict"):
        sd = ocf.convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = ocf.convert_to_custom_text_state_dict(sd)
    for k in ("logit_scale", "logit_bias"):
        t = getattr(model, k, None)
        if k in sd and t is not None and t.ndim != sd[k].ndim:
            sd[k] = sd[k].reshape(t.shape)
    ocf.resize_pos_embed(sd, model)
    ocf.resize_text_pos_embed(sd, model)
    return sd


def create_open_clip(model_name: str, source: str | None = None, cfg: dict | None = None, **overrides):
    """An open_clip model (built-in architecture ``model_name`` with config ``overrides``) with
    weights from a local file or ``s3://`` (never a built-in pretrained tag: nothing is downloaded)."""
    import open_clip

    model = open_clip.create_model(model_name, pretrained=None, **overrides)
    if source:
        load_into(model, source, cfg, filter_fn=_open_clip_filter, what=f"open_clip {model_name}")
    return model


# ----------------------------------------------------------------------------- provenance
def _slots(cfg: dict) -> list[tuple[dict, str, str]]:
    """``[(the dict holding it, key, dotted key)]`` of every weights source named in ``cfg["method"]``."""
    out = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in WEIGHT_KEYS and isinstance(v, str) and v.strip():
                    out.append((node, k, f"{path}.{k}"))
                elif isinstance(v, dict):
                    walk(v, f"{path}.{k}")

    walk(cfg.get("method") or {}, "method")
    return out


def sources(cfg: dict) -> list[tuple[str, str]]:
    """``[(dotted key, source)]`` of every weights source named in ``cfg["method"]``."""
    return [(dotted, node[k]) for node, k, dotted in _slots(cfg)]


def absolute_paths(cfg: dict) -> dict:
    """Rewrite, in place, the run's relative local weights sources and ``weights.cache`` /
    ``weights.timm_dir`` as absolute paths of this (the driver's) working directory: Ray Train
    and Tune workers run in their own trial folders, where a relative path names nothing.
    s3:// URIs and timm: tags are left as they are. Returns ``cfg``."""
    def absolute(v: str) -> str:
        return v if v.startswith("timm:") or storage.is_s3(v) else os.path.abspath(os.path.expanduser(v))

    for node, k, _ in _slots(cfg):
        node[k] = absolute(str(node[k]))
    wb = cfg.get("weights")
    if isinstance(wb, dict):
        for k in ("cache", "timm_dir"):
            if isinstance(wb.get(k), str) and wb[k].strip():
                wb[k] = absolute(wb[k])
    return cfg


def provenance(cfg: dict) -> list[dict]:
    """Path, resolved local file, sha256 and size of every weights source of the run (an
    unreadable source raises ``WeightsError`` before anything trains)."""
    out = []
    for key, src in sources(cfg):
        path = local_file(src, cfg)
        out.append({"key": key, "source": src, "file": path, "sha256": sha256(path), "bytes": os.path.getsize(path)})
    return out


def provenance_lines(items: list[dict]) -> list[str]:
    if not items:
        return ["weights: none (random init)"]
    return [f"weights {w['key']}: {w['source']} sha256 {w['sha256']}" for w in items]

