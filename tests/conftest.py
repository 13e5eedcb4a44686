"""Shared fixtures. One Ray cluster per test session: a head started with ``ray start`` on free
loopback ports and its own temp dir (so ``ray job submit`` can be tested against it too), joined
by this process with ``ray.init``; stopped at the end by the PIDs of its own processes."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF_DIR = os.path.join(REPO, "experiments", "conf")
BIN = os.path.dirname(sys.executable)
# Keep every Ray process on the loopback interface (Ray otherwise swaps 127.0.0.1 for the
# machine's routable address; this switch makes it use the loopback address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# the Serve graph's defaults (serve.proxy: haproxy, serve.throughput_optimized: true) need these in
# every Ray process from the start: the session's cluster gets them, so the HTTP tests go through the
# default path (tests/test_serve_graph.py checks they equal trustlab.serve.settings.cluster_env)
SERVE_CLUSTER_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
for _k, _v in SERVE_CLUSTER_ENV.items():
    os.environ.setdefault(_k, _v)
# slow worker starts on a busy 2-core machine must not trigger Train's retry-with-a-new-group loop
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_using(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "--", marker], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def with_descendants(pids) -> list[int]:
    out, todo = [], list(pids)
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        kids = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        todo.extend(int(k) for k in kids)
    return out


def stop_pids(pids, timeout: float = 15.0) -> None:
    pids = with_descendants(pids)
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.time() + timeout
    while time.time() < end and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # zombies count as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="session")
def ray_head():
    """``{"address", "dashboard", "temp_dir", "env"}`` of a running head; this process is joined."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="tlr", dir="/tmp")
    port, dash, agent = free_port(), free_port(), free_port()
    # PATH starts with this interpreter's bin so `python` in a submitted job's entrypoint is ours
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    cmd = [os.path.join(BIN, "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--temp-dir={temp_dir}",
           f"--num-cpus={os.cpu_count()}", "--disable-usage-stats"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        stop_pids(_pids_using(temp_dir) + _pids_using(f"--address=127.0.0.1:{port}"))
        raise RuntimeError(f"ray start failed:\n{r.stdout}\n{r.stderr}")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    address = f"127.0.0.1:{port}"
    ray.init(address=address, log_to_driver=True)
    info = {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "temp_dir": temp_dir, "env": env}
    # Serve's HAProxy keeps its config under /tmp/haproxy-serve/<node id>/, outside temp_dir
    node_id = ray.get_runtime_context().get_node_id()
    try:
        yield info
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        stop_pids(_pids_using(temp_dir) + _pids_using(f"--address=127.0.0.1:{port}")
                  + _pids_using(f"haproxy-serve/{node_id}/"))


def _single_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one intra-op thread (and do not spin on a busy machine);
    the previous thread count is restored afterwards."""
    yield from _single_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole test module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    yield from _single_thread()


@pytest.fixture(scope="session")
def conf_dir():
    return CONF_DIR


def compose(overrides=(), tmp_path=None):
    """Compose a config like the entry point does, with run folders under ``tmp_path``."""
    from trustlab.platform.config import compose as _compose

    ov = list(overrides)
    if tmp_path is not None:
        ov.append(f"run.root={tmp_path}")
    return _compose(CONF_DIR, ov)


def ci_overrides(method: str) -> list[str]:
    from omegaconf import OmegaConf

    y = OmegaConf.load(os.path.join(CONF_DIR, "method", f"{method}.yaml"))
    return list(y.get("ci_overrides", []))


def orphans(address: str) -> dict:
    """What a dead driver left on the cluster: actors (not detached) and placement groups (not
    detached) of jobs the GCS marks dead. Ray fate-shares both with their job, so none should
    exist; a driver killed by SIGKILL mid-trial has left a TrainController holding its workers'
    group (CI, stop 32: the resumed sweep waited 600 s for workers and every later Ray test starved)."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    dead = {j["JobID"] for j in ray._private.state.jobs() if j["IsDead"]}
    actors = [a for a in list_actors(address=address, limit=1000, detail=True, raise_on_missing_output=False)
              if a.state != "DEAD" and not a.is_detached and a.job_id in dead]
    groups = [g for g in list_placement_groups(address=address, limit=1000, detail=True,
                                               raise_on_missing_output=False)
              if g.state != "REMOVED" and not g.is_detached and g.creator_job_id in dead]
    return {"actors": actors, "groups": groups}


def end_orphans(address: str) -> list[str]:
    """End :func:`orphans` (actors by PID, groups through the GCS); returns what was ended, one
    line each, so a test can say what it had to clean."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    found = orphans(address)
    ended = [f"actor {a.class_name} pid {a.pid} of dead job {a.job_id} ({a.state})" for a in found["actors"]]
    stop_pids([int(a.pid) for a in found["actors"] if a.pid], timeout=5)
    for g in found["groups"]:
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(g.placement_group_id))))
            ended.append(f"placement group {g.placement_group_id} of dead job {g.creator_job_id} ({g.state})")
        except Exception as e:  # already gone between the listing and now
            ended.append(f"placement group {g.placement_group_id}: not removed ({e})")
    return ended


@pytest.fixture(autouse=True)
def _no_leftover_train_controllers(request):
    """Between tests no Ray Train run is active, yet a finished run's TrainController actor can
    linger (seen after a resumed run) and keep its worker placement group, starving the next
    test's workers. Before each test on the session cluster, end such leftovers by PID, and
    whatever a dead driver's job left (:func:`end_orphans`)."""
    if "ray_head" in request.fixturenames:
        head = request.getfixturevalue("ray_head")
        try:
            from ray.util.state import list_actors

            for a in list_actors(address=head["address"], limit=100, raise_on_missing_output=False,
                                 filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")]):
                if a.pid:
                    stop_pids([int(a.pid)], timeout=5)
            for line in end_orphans(head["address"]):
                print(f"[conftest] ended before {request.node.name}: {line}")
        except Exception as e:  # the state API is best effort; never fail a test here
            print(f"[conftest] could not check for leftover Train controllers: {e}")
    yield
