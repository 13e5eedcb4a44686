"""Basic Ray Serve path: one detector loaded from a checkpoint behind a FastAPI ingress.

    POST /predict   multipart field ``file`` (an image) -> {"score", "verdict", "method"}
    GET  /healthz   -> {"status": "ok", "method": ...}

An undecodable or empty upload gets a 400 JSON error and the replica stays up. The checkpoint
(``model.pt``, local or s3://) carries its resolved config, so nothing else is needed to
rebuild the model.
"""

import io
import os
import time

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import JSONResponse
from ray import serve

api = FastAPI(title="trustlab detector")


def decode_image(data: bytes):
    """Bytes -> RGB uint8 array, or raise ValueError with a reason."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("empty upload")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image: {e.__class__.__name__}") from None
    return np.asarray(im.convert("RGB"))


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, health_check_period_s=10)
@serve.ingress(api)
class Detector:
    def __init__(self, checkpoint: str, s3_endpoint=None, max_body_mb: float = 20.0):
        import torch

        from trustlab.platform.checkpoints import load_state
        from trustlab.platform.train import load_model

        state = load_state(checkpoint, s3_endpoint)
        self.cfg = state["cfg"]
        self.method, self.model = load_model(self.cfg, state)
        self.threshold = float(self.cfg["trainer"].get("threshold", 0.5))
        self.max_bytes = int(max_body_mb * 1024 * 1024)
        torch.set_num_threads(1)

    def score(self, images: list) -> list[float]:
        import torch

        with torch.no_grad():
            batch = self.method.serve_inputs(images, self.cfg)
            return [float(s) for s in self.method.predict(self.model, batch, self.cfg)]

    @api.get("/healthz")
    def healthz(self):
        return {"status": "ok", "method": self.method.name}

    @api.post("/predict")
    async def predict(self, file: UploadFile = File(...)):
        t0 = time.perf_counter()
        data = await file.read()
        if len(data) > self.max_bytes:
            return JSONResponse({"error": f"upload larger than {self.max_bytes} bytes"}, status_code=413)
        try:
            img = decode_image(data)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        s = self.score([img])[0]
        return {"method": self.method.name, "score": s, "verdict": "fake" if s >= self.threshold else "real",
                "threshold": self.threshold, "ms": round(1000 * (time.perf_counter() - t0), 2)}

    def check_health(self):
        if self.model is None:
            raise RuntimeError("model not loaded")


def build_app(cfg: dict):
    run_dir = os.path.abspath(os.path.join(cfg["run"]["root"], cfg["run"]["name"] or ""))
    ckpt = cfg["serve"].get("checkpoint") or os.path.join(run_dir, "checkpoints", "best.pt")
    return Detector.options(num_replicas=int(cfg["serve"]["num_replicas"])).bind(
        ckpt, cfg["run"].get("s3_endpoint"), float(cfg["serve"]["max_body_mb"]))


def start(cfg: dict, blocking: bool = False):
    """Deploy on the running (or embedded) Ray cluster at serve.host:serve.port."""
    from trustlab.platform.runtime import init_ray

    init_ray(cfg)
    s = cfg["serve"]
    serve.start(http_options={"host": s["host"], "port": int(s["port"])})
    handle = serve.run(build_app(cfg), name="trustlab", route_prefix=s["route_prefix"], blocking=False)
    print(f"[trustlab] serving on http://{s['host']}:{s['port']}{s['route_prefix'].rstrip('/')}/predict "
          f"(health: /healthz)", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle


def serve_forever(cfg: dict):
    if not cfg["run"].get("name") and not cfg["serve"].get("checkpoint"):
        from trustlab.platform.config import ConfigError

        raise SystemExit("error: mode=serve needs serve.checkpoint=<model.pt> or run.name=<a trained run>")
    start(cfg, blocking=True)
