"""The HTTP layer of the detection graph: the FastAPI ingress and what it does with a request.

- ``POST /v1/detect``: an image or a video as a multipart upload in field ``file``, or
  ``{"uri": "s3://..."}`` as JSON; optional ``detectors`` to pick a subset and ``caption`` for
  detectors that read one. Answers every selected detector's score, the fused score
  (``trustlab.serve.fusion``: cheap arithmetic, so it runs here rather than behind one more hop)
  and a verdict.
- ``POST /predict`` (a graph serving one detector, e.g. ``mode=serve run.name=<run>``): the same
  request, answered as ``{"method", "score", "verdict", "threshold", "ms"}``.
- ``GET /v1/detectors``, ``GET /healthz``, OpenAPI at ``/docs``.

The ingress enforces the limits (body size, per-request deadline) and turns every bad input into
a 4xx JSON ``{"error": reason, "code": ...}``. Access: with API keys configured (``serve.auth``:
an environment variable or a file, read by the ingress replica) every route but ``/healthz`` and
the OpenAPI pages needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (401 otherwise;
keys are compared as SHA-256 digests with ``hmac.compare_digest``, every key every time); a
``{"uri": ...}`` request may read only under ``serve.allowed_uri_prefixes`` (403 otherwise; none by default). ``GraphCore`` fans the prepared input out to the
selected detectors concurrently: a detector that raises (or returns a non-finite score, or
misses the deadline) is reported with ``"status": "failed"`` and its reason while the others
answer; the request fails with 503 only when every applicable detector failed.
"""
# no `from __future__ import annotations`: FastAPI must resolve the route annotations (Request)
import asyncio
import hashlib
import hmac
import json
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from trustlab.serve.errors import RequestError, reason
from trustlab.serve.fusion import Fusion, FusionError, load_stacker
from trustlab.serve.inputs import (IMAGE_EXT, MODALITIES, VIDEO_EXT, Preprocessor, detector_item, item_nbytes,
                                   modality_needs, sniff_kind)

#: Detector calls at most this large go by value over the replicas' direct gRPC channel when
#: handle_transport=grpc; Serve's replica gRPC servers accept 4 MiB messages by default
#: (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH), so larger inputs (long videos' frames) go by reference.
GRPC_MAX_ITEM_BYTES = 3 * 2**20

api = FastAPI(
    title="trustlab detection graph",
    version="1",
    description="Image and video forgery detection: each selected detector's score, the fused score and a verdict.",
)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError):
    headers = {"WWW-Authenticate": 'Bearer realm="trustlab"'} if exc.status == 401 else None
    return JSONResponse({"error": exc.reason, "code": exc.code}, status_code=exc.status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse({"error": f"invalid request: {exc.errors()[:3]}", "code": "invalid_request"}, status_code=422)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    return JSONResponse({"error": f"internal error: {reason(exc)}", "code": "internal"}, status_code=500)


_DETECT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary", "description": "an image (image/*) or a video (video/*)"},
                "detectors": {"type": "string", "description": "comma-separated subset of detectors (default: all)"},
                "caption": {"type": "string", "description": "caption for detectors that check image-text consistency"},
            }}},
        "application/json": {"schema": {
            "type": "object", "required": ["uri"], "additionalProperties": False,
            "properties": {
                "uri": {"type": "string", "description": "s3://bucket/key of an image or a video"},
                "kind": {"type": "string", "enum": ["image", "video"], "description": "default: from the extension or the bytes"},
                "detectors": {"type": "array", "items": {"type": "string"}},
                "caption": {"type": "string"},
            }}},
    },
}
_ERR = {"content": {"application/json": {"schema": {"type": "object", "properties": {
    "error": {"type": "string"}, "code": {"type": "string"}}}}}}
_DETECT_RESPONSES = {
    400: {"description": "bad input (corrupt file, empty body, malformed JSON, unknown detector)", **_ERR},
    401: {"description": "API keys are configured and the request has none, or a wrong one", **_ERR},
    403: {"description": "the 'uri' is not under serve.allowed_uri_prefixes", **_ERR},
    413: {"description": "body, image or video over the limits", **_ERR},
    415: {"description": "unsupported content type", **_ERR},
    422: {"description": "no selected detector accepts this input", **_ERR},
    503: {"description": "every applicable detector failed", **_ERR},
    504: {"description": "preprocessing missed the request deadline", **_ERR},
}
_PREDICT_BODY = {"required": True, "content": {"multipart/form-data": _DETECT_BODY["content"]["multipart/form-data"]}}
_PREDICT_RESPONSES = {**_DETECT_RESPONSES, 404: {"description": "the graph serves more than one detector", **_ERR}}
JSON_FIELDS = ("uri", "kind", "detectors", "caption")


# ----------------------------------------------------------------------------- access
def load_api_keys(auth: dict) -> list[bytes]:
    """SHA-256 digests of the API keys of ``serve.auth`` (``keys_env``: comma-separated keys in that
    environment variable; ``keys_file``: one key per line, ``#`` comments). Empty: no keys, open."""
    keys = [k.strip() for k in os.environ.get(auth.get("keys_env") or "", "").split(",")]
    path = auth.get("keys_file")
    if path:
        try:
            with open(os.path.expanduser(path)) as f:
                keys += [ln.split("#", 1)[0].strip() for ln in f]
        except OSError as e:
            raise RuntimeError(f"serve.auth.keys_file {path!r} cannot be read: {e.strerror}") from None
        if not any(keys):
            raise RuntimeError(f"serve.auth.keys_file {path!r} holds no key")
    return [hashlib.sha256(k.encode()).digest() for k in keys if k]


def check_api_key(request: Request, digests: list[bytes]) -> None:
    """RequestError 401 unless the request carries one of the keys (constant time per key, and
    every key is compared whatever matched, so the time says nothing about which)."""
    if not digests:
        return
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "").strip()
    if not key:
        raise RequestError(401, "missing_api_key", "this server needs an API key: send 'Authorization: Bearer <key>' "
                                                   "or 'X-API-Key: <key>'")
    got, ok = hashlib.sha256(key.encode()).digest(), False
    for d in digests:
        ok |= hmac.compare_digest(got, d)
    if not ok:
        raise RequestError(401, "invalid_api_key", "the API key is not valid")


def uri_allowed(uri: str, prefixes) -> bool:
    """``uri`` lies under one of ``prefixes`` (each ``s3://bucket/...`` ending in '/'); URIs with
    empty, '.' or '..' segments are never allowed (a store may normalise them out of the prefix)."""
    segments = uri[len("s3://"):].split("/")
    if any(p in ("", ".", "..") for p in segments[:-1]) or segments[-1] in (".", ".."):
        return False
    return any(uri.startswith(p) for p in prefixes or ())


async def _await(resp):
    return await resp


async def _read_body(request: Request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise RequestError(400, "bad_request", f"invalid Content-Length {cl!r}") from None
        if n > limit:
            raise RequestError(413, "body_too_large", f"body of {n} bytes exceeds the limit of {limit} bytes")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise RequestError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_request(request: Request, s: dict) -> dict:
    """An HTTP request -> ``{"data" | "uri", "kind", "detectors", "caption"}``, or RequestError."""
    max_bytes = int(float(s["max_body_mb"]) * 2**20)
    ctype = request.headers.get("content-type", "")
    mtype = ctype.split(";")[0].strip().lower()
    if mtype == "multipart/form-data":
        body = await _read_body(request, max_bytes + 64 * 1024)
        if not body:
            raise RequestError(400, "empty_body", "empty request body (expected a multipart upload in field 'file')")
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartParser

        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=8).parse()
        except Exception as e:  # noqa: BLE001 - MultiPartException, bad boundary, ...
            raise RequestError(400, "malformed_multipart", f"malformed multipart body: {reason(e)}") from None
        try:
            up = form.get("file")
            if not isinstance(up, UploadFile):
                raise RequestError(400, "missing_file", "multipart body has no file part named 'file'")
            data = await up.read()
            part_type = (up.content_type or "application/octet-stream").split(";")[0].strip().lower()
            det_field, caption = form.get("detectors"), form.get("caption")
        finally:
            await form.close()
        if len(data) > max_bytes:
            raise RequestError(413, "body_too_large", f"upload of {len(data)} bytes exceeds the limit of "
                                                      f"{max_bytes} bytes (max_body_mb)")
        if not data:
            raise RequestError(400, "empty_upload", "empty upload: the file has no bytes")
        if part_type.startswith("image/"):
            kind = "image"
        elif part_type.startswith("video/"):
            kind = "video"
        elif part_type == "application/octet-stream":
            kind = None
        else:
            raise RequestError(415, "unsupported_media_type",
                               f"file part has content type {part_type!r}; expected image/*, video/* or "
                               "application/octet-stream")
        sel = request.query_params.get("detectors") or (det_field if isinstance(det_field, str) else None)
        return {"data": data, "uri": None, "kind": kind, "detectors": sel,
                "caption": caption if isinstance(caption, str) and caption else None}
    if mtype == "application/json":
        body = await _read_body(request, int(s["max_json_kb"]) * 1024)
        if not body.strip():
            raise RequestError(400, "empty_body", "empty request body (expected a JSON object with 'uri')")
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise RequestError(400, "malformed_json", f"malformed JSON: {e}") from None
        if not isinstance(obj, dict):
            raise RequestError(400, "malformed_json", "the JSON body must be an object with 'uri'")
        extra = sorted(set(obj) - set(JSON_FIELDS))
        if extra:
            raise RequestError(400, "bad_request", f"unknown JSON field(s) {extra}; valid: {', '.join(JSON_FIELDS)}")
        uri = obj.get("uri")
        if not isinstance(uri, str) or not uri.startswith("s3://") or len(uri) <= len("s3://"):
            raise RequestError(400, "bad_uri", f"'uri' must be an s3:// URI, got {uri!r}")
        if not uri_allowed(uri, s.get("allowed_uri_prefixes")):
            raise RequestError(403, "uri_not_allowed", f"{uri} is not under an allowed prefix" + (
                "" if s.get("allowed_uri_prefixes") else ": this server reads no URIs (serve.allowed_uri_prefixes "
                                                         "is empty); upload the file instead"))
        kind = obj.get("kind")
        if kind is None:
            low = uri.lower()
            kind = "image" if low.endswith(IMAGE_EXT) else "video" if low.endswith(VIDEO_EXT) else None
        elif kind not in ("image", "video"):
            raise RequestError(400, "bad_request", f"'kind' must be image or video, got {kind!r}")
        cap = obj.get("caption")
        if cap is not None and not isinstance(cap, str):
            raise RequestError(400, "bad_request", "'caption' must be a string")
        sel = obj.get("detectors", request.query_params.get("detectors"))
        return {"data": None, "uri": uri, "kind": kind, "detectors": sel, "caption": cap or None}
    raise RequestError(415, "unsupported_media_type",
                       f"content type {mtype or '(none)'!r}; send multipart/form-data (field 'file') "
                       "or application/json ({\"uri\": \"s3://...\"})")


class GraphCore:
    """What the ingress does with a parsed request, given handles to the preprocessing and
    detector deployments (anything with ``.method.remote(...)`` returning an awaitable with
    ``cancel()``): pick detectors, prepare the input, fan out under the deadline, fuse."""

    def __init__(self, preprocess, detectors: dict, settings: dict):
        self.pre = preprocess
        self.handles = dict(detectors)
        self.names = [d["name"] for d in settings["detectors"]]
        self.s = settings
        self.threshold = float(settings["threshold"])
        self.timeout = float(settings["request_timeout_s"])
        f = settings["fusion"]
        stacker = load_stacker(f["stacker"], settings.get("s3_endpoint")) if f["method"] == "logistic" else None
        self.fusion = Fusion(f["method"], f["weights"], stacker, self.names)
        self._info: dict = {}
        # small detector calls by value over gRPC (Serve's by-value handle path: no object-store round
        # trip per request); the plain handles (by reference) carry large items and every other call
        self.by_value = {n: h.options(_by_reference=False) for n, h in self.handles.items()
                         if settings.get("handle_transport") == "grpc" and hasattr(h, "options")}
        # image uploads are prepared here (a worker thread of the ingress replica) instead of one more
        # handle round trip to the preprocessing deployment: same Preprocessor code, one hop fewer
        self.local_pre = Preprocessor(settings) if settings.get("inline_images") else None

    def prepare_inline(self, req: dict) -> bool:
        """Whether this request is prepared in the ingress: an uploaded image (not a video, not s3://)."""
        if self.local_pre is None or req.get("data") is None:
            return False
        kind = req.get("kind") or sniff_kind(req["data"])
        req["kind"] = kind
        return kind == "image"

    async def call(self, resp, timeout: float):
        """Await a handle call for at most ``timeout`` seconds (cancelled when late)."""
        try:
            return await asyncio.wait_for(_await(resp), max(0.01, timeout))
        except asyncio.TimeoutError:
            resp.cancel()
            raise

    async def detector_info(self, name: str, timeout: float):
        if name not in self._info:
            try:
                self._info[name] = await self.call(self.handles[name].info.remote(), timeout)
            except asyncio.TimeoutError:
                return RuntimeError(f"unavailable: no answer to info within {timeout:.1f} s")
            except Exception as e:  # noqa: BLE001
                return RuntimeError(f"unavailable: {reason(e)}")
        return self._info[name]

    def select(self, sel) -> list[str]:
        if sel is None or sel == "" or sel == []:
            return list(self.names)
        if isinstance(sel, str):
            names = [x.strip() for x in sel.split(",") if x.strip()]
        elif isinstance(sel, list) and all(isinstance(x, str) for x in sel):
            names = [x.strip() for x in sel]
        else:
            raise RequestError(400, "bad_request", "detectors must be a list of names or a comma-separated string")
        unknown = [n for n in names if n not in self.handles]
        if unknown:
            raise RequestError(400, "unknown_detector",
                               f"unknown detector(s) {unknown}; this graph serves: {', '.join(self.names)}")
        return list(dict.fromkeys(names))

    def handle_for(self, name: str, item: dict):
        """The by-value (gRPC) handle for an item under ``GRPC_MAX_ITEM_BYTES``, else the by-reference one."""
        fast = self.by_value.get(name)
        return fast if fast is not None and item_nbytes(item) <= GRPC_MAX_ITEM_BYTES else self.handles[name]

    async def score(self, name: str, item: dict, deadline: float) -> dict:
        t = time.perf_counter()
        try:
            r = await self.call(self.handle_for(name, item).score.remote(item), deadline - time.perf_counter())
        except asyncio.TimeoutError:
            return {"status": "failed", "error": f"timed out (request_timeout_s={self.timeout})",
                    "ms": round(1000 * (time.perf_counter() - t), 3)}
        except Exception as e:  # noqa: BLE001 - the replica raised or died
            return {"status": "failed", "error": reason(e), "ms": round(1000 * (time.perf_counter() - t), 3)}
        return {"status": "ok", **r, "ms": round(1000 * (time.perf_counter() - t), 3)}

    async def detect(self, req: dict, t0: float | None = None) -> tuple[int, dict]:
        """A parsed request -> ``(HTTP status, JSON body)``; bad input raises RequestError."""
        t0 = time.perf_counter() if t0 is None else t0
        deadline = t0 + self.timeout
        req = dict(req)
        names = self.select(req.pop("detectors", None))
        caption = req.pop("caption", None)
        t_read = time.perf_counter()
        infos = dict(zip(names, await asyncio.gather(
            *(self.detector_info(n, deadline - time.perf_counter()) for n in names))))
        results = {n: {"status": "failed", "error": str(i)} for n, i in infos.items() if isinstance(i, Exception)}
        live = {n: i for n, i in infos.items() if not isinstance(i, Exception)}
        mods = sorted({i["modality"] for i in live.values()})
        if live and not modality_needs(req.get("kind"), mods):
            raise RequestError(422, "no_applicable_detector",
                               f"the selected detectors ({', '.join(live)}) need a video; got an image")
        pre_req = {**req, "modalities": mods or list(MODALITIES)}
        try:
            if self.prepare_inline(pre_req):
                pre = await asyncio.wait_for(asyncio.to_thread(self.local_pre.run, pre_req),
                                             max(0.01, deadline - time.perf_counter()))
            else:
                pre = await self.call(self.pre.run.remote(pre_req), deadline - time.perf_counter())
        except asyncio.TimeoutError:
            raise RequestError(504, "timeout", f"preprocessing missed the deadline (request_timeout_s={self.timeout})") \
                from None
        except Exception as e:  # noqa: BLE001
            raise RequestError(503, "preprocess_failed", f"preprocessing failed: {reason(e)}") from None
        if not pre["ok"]:
            raise RequestError(pre["status"], pre["code"], pre["error"])
        t_pre = time.perf_counter()
        kind, tasks = pre["kind"], {}
        for n, i in live.items():
            item = detector_item(kind, i["modality"], pre["inputs"], caption)
            if item is None:
                results[n] = {"status": "skipped", "reason": f"{i['method']} needs a video input"}
            else:
                tasks[n] = self.score(n, item, deadline)
        if not tasks and not any(r["status"] == "failed" for r in results.values()):
            raise RequestError(422, "no_applicable_detector", f"no selected detector accepts a {kind} input")
        for n, r in zip(tasks, await asyncio.gather(*tasks.values())):
            results[n] = {"method": live[n]["method"], **r}
        t_det = time.perf_counter()
        ok = {n: r["score"] for n, r in results.items() if r["status"] == "ok"}
        body = {"kind": kind, "detectors": {n: results[n] for n in names}, "input": pre["meta"],
                "threshold": self.threshold}
        if not ok:
            body.update(error="every applicable detector failed", code="all_detectors_failed")
            return 503, body
        try:
            fused = self.fusion(ok)
        except FusionError as e:
            body.update(error=f"fusion failed: {e}", code="fusion_failed")
            return 503, body
        t_end = time.perf_counter()
        body.update(score=fused["score"], verdict="fake" if fused["score"] >= self.threshold else "real",
                    fusion=fused, degraded=any(r["status"] == "failed" for r in results.values()),
                    timings_ms={"read": round(1000 * (t_read - t0), 3), "preprocess": round(1000 * (t_pre - t_read), 3),
                                "preprocess_replica": pre["ms"], "detectors": round(1000 * (t_det - t_pre), 3),
                                "fusion": round(1000 * (t_end - t_det), 3), "total": round(1000 * (t_end - t0), 3)})
        return 200, body

    async def predict(self, req: dict, t0: float | None = None) -> tuple[int, dict]:
        """``detect`` for a graph of one detector, answered as ``{"method", "score", "verdict",
        "threshold", "ms"}`` (errors as ``{"error", "code"}``); bad input raises RequestError."""
        t0 = time.perf_counter() if t0 is None else t0
        if len(self.names) != 1:
            raise RequestError(404, "not_one_detector", f"/predict answers for a graph of one detector; this one "
                                                        f"serves {', '.join(self.names)}: use /v1/detect")
        (name,) = self.names
        status, body = await self.detect({**req, "detectors": None}, t0)
        det = body["detectors"][name]
        if status != 200:
            why = det.get("error") or det.get("reason")
            return status, {"error": f"{body['error']}: {why}" if why else body["error"], "code": body["code"]}
        return 200, {"method": det["method"], "score": body["score"], "verdict": body["verdict"],
                     "threshold": body["threshold"], "ms": round(1000 * (time.perf_counter() - t0), 2)}

    async def describe(self) -> dict:
        infos = await asyncio.gather(*(self.detector_info(n, 10.0) for n in self.names))
        dets = [{"name": n, "status": "unavailable", "error": str(i)} if isinstance(i, Exception)
                else {"status": "ok", **i} for n, i in zip(self.names, infos)]
        s = self.s
        return {"detectors": dets, "fusion": self.fusion.describe(), "threshold": self.threshold,
                "limits": {"max_body_mb": s["max_body_mb"], "max_image_pixels": s["max_image_pixels"],
                           "max_video_frames": s["max_video_frames"], "max_video_seconds": s["max_video_seconds"],
                           "request_timeout_s": s["request_timeout_s"]},
                "video": s["video"]}

    async def health(self) -> tuple[int, dict]:
        async def ping(h):
            try:
                await self.call(h.ping.remote(), 5.0)
                return "ok"
            except asyncio.TimeoutError:
                return "timeout"
            except Exception as e:  # noqa: BLE001
                return reason(e)

        pre, *dets = await asyncio.gather(ping(self.pre), *(ping(self.handles[n]) for n in self.names))
        det = dict(zip(self.names, dets))
        n_ok = sum(v == "ok" for v in det.values())
        status = "ok" if pre == "ok" and n_ok == len(det) else "degraded" if pre == "ok" and n_ok else "unavailable"
        return (200 if status != "unavailable" else 503), {"status": status, "preprocess": pre, "detectors": det}


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    """The FastAPI ingress: HTTP in and out; the work is GraphCore's."""

    def __init__(self, preprocess, detectors: dict, settings: dict):
        self.s = settings
        self.keys = load_api_keys(settings.get("auth") or {})
        self.core = GraphCore(preprocess, detectors, settings)

    async def _answer(self, request: Request, handle) -> JSONResponse:
        t0 = time.perf_counter()
        check_api_key(request, self.keys)
        status, body = await handle(await parse_request(request, self.s), t0)
        # the body is plain JSON types already: a JSONResponse skips FastAPI's jsonable_encoder walk
        return JSONResponse(body, status_code=status)

    @api.post("/v1/detect", openapi_extra={"requestBody": _DETECT_BODY}, responses=_DETECT_RESPONSES,
              summary="Score an image or a video with the selected detectors and fuse the scores")
    async def detect(self, request: Request):
        return await self._answer(request, self.core.detect)

    @api.post("/predict", openapi_extra={"requestBody": _PREDICT_BODY}, responses=_PREDICT_RESPONSES,
              summary="A graph of one detector: score an upload with it")
    async def predict(self, request: Request):
        return await self._answer(request, self.core.predict)

    @api.get("/v1/detectors", summary="The detectors this graph serves, the fusion and the limits")
    async def detectors(self, request: Request):
        check_api_key(request, self.keys)
        return await self.core.describe()

    @api.get("/healthz", summary="Liveness of the preprocessing and detector deployments")
    async def healthz(self):
        status, body = await self.core.health()
        return JSONResponse(body, status_code=status)

    def check_health(self) -> None:
        if self.core.fusion is None:
            raise RuntimeError("fusion not configured")
