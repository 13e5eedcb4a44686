"""The detector runner of the detection graph: a registered method rebuilt from its checkpoint
(``model.pt``, local or ``s3://``; it carries its resolved config) scoring lists of request items,
all units of a batch of requests together, on one torch thread. The ``detector-<name>``
deployments (``trustlab.serve.deployments``) batch requests into it with ``@serve.batch``; the
same code runs without Serve in benchmarks and tests."""
import asyncio
import concurrent.futures
import time

import numpy as np

from trustlab.serve.errors import DetectorError, reason
from trustlab.serve.inputs import MODALITIES


def serve_adapter(method) -> str:
    """What Serve feeds a method's ``serve_inputs`` (``trustlab.platform.method``): ``"image"``
    unless the method declares ``serve_adapter`` (``"clip"``, ``"image+caption"``)."""
    return method.serve_adapter if method.has("serve_adapter") else "image"


class DetectorRunner:
    """A registered method rebuilt from its checkpoint, scoring lists of request items.

    ``score_items(items) -> [result]``: each item is ``{"images": [HxWx3 uint8, ...]}`` (image and
    face methods) or ``{"clips": (K, T, H, W, 3) uint8}`` (video methods), optionally with
    ``"caption"``; each result is ``{"score": mean over the item's units, "units", ...}`` or
    ``{"error": reason}``. Units of all items are scored together, ``max_forward`` at a time;
    if that fails, items are retried one by one so one bad item does not fail the others."""

    def __init__(self, entry: dict, settings: dict):
        import torch

        from trustlab.platform.checkpoints import load_state
        from trustlab.platform.train import load_model

        self.entry, self.name = entry, entry["name"]
        self.max_forward = int(settings["batching"]["max_forward"])
        self.unhealthy_after = int(settings["unhealthy_after_errors"])
        torch.set_num_threads(int(entry["torch_threads"]))
        state = load_state(entry["checkpoint"], settings.get("s3_endpoint"))
        if not isinstance(state, dict) or not isinstance(state.get("cfg"), dict) or "model" not in state:
            raise ValueError(f"{entry['checkpoint']} is not a trustlab checkpoint (needs 'model' and 'cfg')")
        self.cfg = state["cfg"]
        self.method, self.model = load_model(self.cfg, state)
        if entry.get("method") and self.method.name != entry["method"]:
            raise ValueError(f"detector {self.name}: checkpoint holds method {self.method.name!r}, "
                             f"config says {entry['method']!r}")
        self.modality = getattr(self.method, "modality", "image")
        if self.modality not in MODALITIES:
            raise ValueError(f"detector {self.name}: method {self.method.name} has modality {self.modality!r}; "
                             f"the graph serves {', '.join(MODALITIES)}")
        if not self.method.has("serve_inputs"):
            raise ValueError(f"detector {self.name}: method {self.method.name} has no serving path (serve_inputs)")
        self.takes_captions = serve_adapter(self.method) == "image+caption"
        use_gpu = float(entry.get("num_gpus") or 0) > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model.to(self.device).eval()
        self.epoch, self.stage = state.get("epoch"), state.get("stage")
        self.consecutive_errors = 0
        self.warmup_error = None
        # every forward runs on this one thread: torch's OpenMP pool belongs to the thread that calls
        # it, and forwards hopping over asyncio's default executor threads each get their own pool whose
        # spinning workers compete for the same cores (measured on 2 CPUs, ResNet-18 at 224 px: 39 ms per
        # forward on one thread, 51-54 ms on a second thread after the first had run one)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"torch-{self.name}")
        self.executor.submit(self._warmup).result()

    def info(self) -> dict:
        d = self.cfg["method"].get("data") or {}
        out = {"name": self.name, "method": self.method.name, "modality": self.modality,
               "checkpoint": self.entry["checkpoint"], "epoch": self.epoch, "stage": self.stage,
               "device": str(self.device), "input_size": d.get("size"), "torch_threads": self.entry["torch_threads"],
               "max_batch_size": self.entry["max_batch_size"], "takes_caption": self.takes_captions}
        if self.modality == "video":
            out["clip_len"] = d.get("clip_len")
        if self.warmup_error:
            out["warmup_error"] = self.warmup_error
        return out

    def _warmup(self) -> None:
        s = int((self.cfg["method"].get("data") or {}).get("size") or 64)
        if self.modality == "video":
            t = int((self.cfg["method"].get("data") or {}).get("clip_len") or 8)
            item = {"clips": np.zeros((1, t, s, s, 3), np.uint8)}
        else:
            item = {"images": [np.zeros((s, s, 3), np.uint8)]}
        if self.takes_captions:
            item["caption"] = "a photo"
        r = self.score_items([item])[0]
        self.consecutive_errors = 0
        self.warmup_error = r.get("error")

    def _to_device(self, batch: dict) -> dict:
        import torch

        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @staticmethod
    def _concat(batches: list[dict]) -> dict:
        import torch

        out = {}
        for k in batches[0]:
            vs = [b[k] for b in batches]
            if isinstance(vs[0], torch.Tensor):
                out[k] = torch.cat(vs)
            elif isinstance(vs[0], np.ndarray):
                out[k] = np.concatenate(vs)
            else:
                out[k] = [x for v in vs for x in v]
        return out

    def _predict(self, batch: dict, n: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            s = self.method.predict(self.model, self._to_device(batch), self.cfg)
        s = np.asarray(s.detach().float().cpu().numpy() if isinstance(s, torch.Tensor) else s, np.float64).reshape(-1)
        if len(s) != n:
            raise DetectorError(f"{self.method.name}.predict returned {len(s)} scores for {n} inputs")
        return s

    def _forward(self, items: list[dict]) -> list[np.ndarray]:
        """Scores per unit for each item (list of 1-D arrays)."""
        units, owner = [], []
        for i, it in enumerate(items):
            seq = it["clips"] if self.modality == "video" else it["images"]
            if len(seq) == 0:
                raise DetectorError("empty input")
            for u in seq:
                units.append((u, it.get("caption")))
                owner.append(i)
        scores = []
        for a in range(0, len(units), self.max_forward):
            chunk = units[a:a + self.max_forward]
            if self.modality == "video":
                batch = self._concat([self.method.serve_inputs(list(np.asarray(c)), self.cfg) for c, _ in chunk])
            elif self.takes_captions:
                batch = self.method.serve_inputs([np.asarray(u) for u, _ in chunk], self.cfg,
                                                 captions=[c for _, c in chunk])
            else:
                batch = self.method.serve_inputs([np.asarray(u) for u, _ in chunk], self.cfg)
            scores.append(self._predict(batch, len(chunk)))
        flat = np.concatenate(scores)
        owner = np.asarray(owner)
        return [flat[owner == i] for i in range(len(items))]

    async def score_async(self, items: list[dict]) -> list[dict]:
        """``score_items`` on the runner's torch thread, awaited (the event loop keeps queueing)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.score_items, items)

    def score_items(self, items: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        try:
            per_item = self._forward(items)
            self.consecutive_errors = 0
        except Exception as e:  # noqa: BLE001 - isolate the failing item(s)
            if len(items) == 1:
                self.consecutive_errors += 1
                per_item = [e]
            else:
                per_item = []
                for it in items:
                    try:
                        per_item.append(self._forward([it])[0])
                    except Exception as e1:  # noqa: BLE001
                        self.consecutive_errors += 1
                        per_item.append(e1)
        ms = round(1000 * (time.perf_counter() - t0), 3)
        n_units = sum(len(p) for p in per_item if not isinstance(p, BaseException))
        out = []
        for p in per_item:
            if isinstance(p, BaseException):
                out.append({"error": reason(p)})
            elif not np.isfinite(p).all():
                out.append({"error": f"non-finite score from {self.method.name} ({int((~np.isfinite(p)).sum())} "
                                     f"of {len(p)} inputs)"})
            else:
                r = {"score": float(p.mean()), "units": int(len(p)), "model_ms": ms, "batch_requests": len(items),
                     "batch_units": n_units}
                if len(p) > 1:
                    r["unit_scores"] = [round(float(x), 6) for x in p]
                out.append(r)
        return out

    def check(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")
        if self.consecutive_errors >= self.unhealthy_after:
            raise RuntimeError(f"{self.consecutive_errors} consecutive scoring errors (unhealthy_after_errors)")
