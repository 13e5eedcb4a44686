"""The Serve deployments of the detection graph behind the ingress: ``preprocess`` (decoding,
limits, face crops and clip sampling) and one ``detector-<name>`` per detector, batched with
``@serve.batch`` (batch size and wait from ``user_config``). Each has a ``check_health``."""
import asyncio

from ray import serve

from trustlab.serve.errors import DetectorError
from trustlab.serve.inputs import Preprocessor
from trustlab.serve.runner import DetectorRunner


@serve.deployment(name="preprocess")
class Preprocess:
    """Decoding, limits, face crops and clip sampling (thread pool: decoders release the GIL)."""

    def __init__(self, settings: dict):
        self.p = Preprocessor(settings)

    async def run(self, req: dict) -> dict:
        return await asyncio.to_thread(self.p.run, req)

    def ping(self) -> bool:
        return True

    def check_health(self) -> None:
        self.p.check()


@serve.deployment(name="detector")
class Detector:
    """One detector; ``score`` is batched across concurrent requests with ``@serve.batch``.
    Batch size and wait come from ``user_config`` (changeable without restarting replicas)."""

    def __init__(self, entry: dict, settings: dict):
        self.runner = DetectorRunner(entry, settings)

    def reconfigure(self, user_config: dict) -> None:
        self._batched.set_max_batch_size(int(user_config.get("max_batch_size", 8)))
        self._batched.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[dict]) -> list[dict]:
        # the forward runs on the runner's torch thread so the replica keeps queueing the next batch meanwhile
        return await self.runner.score_async(items)

    async def score(self, item: dict) -> dict:
        r = await self._batched(item)
        if "error" in r:
            raise DetectorError(r["error"])
        return r

    def info(self) -> dict:
        return self.runner.info()

    def ping(self) -> bool:
        return True

    def check_health(self) -> None:
        self.runner.check()
