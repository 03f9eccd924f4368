"""A fleet of `vllm serve` servers behind the `openai` backend: which server each request goes to, and how
the trainer's weights reach every server.

Routing (`Router`): every turn of one trajectory goes to the same server, so that server's prefix
cache holds the conversation so far. A trajectory is named by its requests' `key` without the last
element (the rollout's keys are `(*trajectory key, turn)`, see `tirl.rollout.agent.advance`). A
trajectory seen for the first time goes to the server with the fewest requests in flight (ties in
turn); requests without a key are spread the same way, one by one.

Weights (`FleetWeights`, `backend.openai.weight_sync=vllm_files`): the weights (HF names, LoRA merged,
cast to the generation dtype) are written as safetensors files of at most `WEIGHT_CHUNK_BYTES` each in
a fresh directory under `weight_dir`, which every server must be able to read. For each file, every
server is asked, concurrently, to load it through vLLM's dev-mode HTTP API:
`POST {root}/collective_rpc` with `{"method": "tirl_load_weights", "args": [path], "timeout": ...}`,
which runs `tirl.backends.vllm.TirlWorkerExtension.tirl_load_weights` in every worker of the server
(`model_runner.model.load_weights`); vLLM answers `{"results": [...]}`, one entry per worker, each the
number of tensors that worker read (as text). Every worker must report the file's tensor count. Then
`POST {root}/reset_prefix_cache` drops KV blocks computed by the old weights. `{root}` is the base
URL without its trailing `/v1`. Files are deleted once every server has loaded them. The servers must
run `VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --worker-extension-cls tirl.backends.vllm.TirlWorkerExtension`
(dev mode exposes these endpoints to anyone who can reach the port: keep it on a trusted network).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from tirl.backends.base import GenerationRequest
from tirl.backends.vllm import LOAD_METHOD, WEIGHT_CHUNK_BYTES, WORKER_EXTENSION, weight_chunks
from tirl.errors import TirlError

DEV_MODE_HINT = f"start the server with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls {WORKER_EXTENSION}"
REMEMBERED_TRAJECTORIES = 1 << 16
"""Trajectory -> server assignments kept (the oldest are forgotten first)."""


class WeightSyncError(TirlError):
    """A server of the fleet did not load the weights (the message names the URL, the endpoint and the answer)."""


def server_root(base_url: str) -> str:
    """The server's root URL: `base_url` without a trailing slash and `/v1`."""
    return base_url.rstrip("/").removesuffix("/v1")


def trajectory_of(request: GenerationRequest) -> tuple | None:
    """The trajectory a request belongs to: its key without the turn index (None without a key)."""
    return tuple(request.key[:-1]) if request.key else None


class Router:
    """Sticky assignment of trajectories to `n` servers, new ones to the least busy (see module docstring).
    Call `pick` before sending a request and `done` after its answer."""

    def __init__(self, n: int):
        self.in_flight = [0] * n
        """Requests sent to each server and not answered yet."""
        self._assigned: OrderedDict[tuple, int] = OrderedDict()
        self._turn = 0

    def pick(self, request: GenerationRequest) -> int:
        """The server index for `request` (counted as in flight)."""
        n = len(self.in_flight)
        if n == 1:
            self.in_flight[0] += 1
            return 0
        trajectory = trajectory_of(request)
        index = self._assigned.get(trajectory) if trajectory is not None else None
        if index is None:
            index = min(range(n), key=lambda i: (self.in_flight[i], (i - self._turn) % n))
            self._turn = (index + 1) % n
            if trajectory is not None:
                self._assigned[trajectory] = index
                if len(self._assigned) > REMEMBERED_TRAJECTORIES:
                    self._assigned.popitem(last=False)
        else:
            self._assigned.move_to_end(trajectory)
        self.in_flight[index] += 1
        return index

    def done(self, index: int) -> None:
        self.in_flight[index] -= 1


class FleetWeights:
    """Pushes weights to every server of a fleet through vLLM's dev-mode HTTP endpoints (module docstring)."""

    def __init__(self, base_urls: Sequence[str], weight_dir: str, dtype: torch.dtype, timeout_s: float,
                 chunk_bytes: int | None = None):
        """`weight_dir`: readable by every server under the same path; `dtype`: what floating tensors are
        cast to; `timeout_s`: per HTTP call (and the `collective_rpc` timeout); `chunk_bytes`: largest file
        (default `WEIGHT_CHUNK_BYTES`)."""
        self.roots = [server_root(u) for u in base_urls]
        self.weight_dir = os.path.abspath(weight_dir)
        self.dtype = dtype
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes or WEIGHT_CHUNK_BYTES

    @torch.no_grad()
    def push(self, state_dict: dict[str, Any]) -> int:
        """Every server loads `state_dict` (HF names), then resets its prefix cache; returns the number of
        files written. Raises `WeightSyncError` naming the first server that failed."""
        import httpx2
        from safetensors.torch import save_file

        os.makedirs(self.weight_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="tirl-weights-", dir=self.weight_dir)
        os.chmod(tmp, 0o755)  # servers may run as another user
        files = 0
        try:
            with httpx2.Client(timeout=self.timeout_s) as client, ThreadPoolExecutor(len(self.roots)) as pool:
                for chunk in weight_chunks(state_dict, self.dtype, self.chunk_bytes):
                    path = os.path.join(tmp, f"chunk-{files:05d}.safetensors")
                    save_file(chunk, path)
                    files += 1
                    try:
                        list(pool.map(lambda root: self._load(client, root, path, len(chunk)), self.roots))
                    finally:
                        os.remove(path)
                list(pool.map(lambda root: self._post(client, root, "/reset_prefix_cache", None), self.roots))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return files

    def _load(self, client, root: str, path: str, expected: int) -> None:
        """One server loads one file in every worker; each worker must report `expected` tensors."""
        body = {"method": LOAD_METHOD, "args": [path], "timeout": self.timeout_s}
        answer = self._post(client, root, "/collective_rpc", body)
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or not results:
            raise WeightSyncError(f"weight sync: POST {root}/collective_rpc ({LOAD_METHOD}) answered {answer!r}, "
                                  "expected {\"results\": [one tensor count per worker]}")
        if any(_count(r) != expected for r in results):
            raise WeightSyncError(f"weight sync: POST {root}/collective_rpc: the server's {len(results)} workers "
                                  f"loaded {results} tensors of {path}, expected {expected} each")

    def _post(self, client, root: str, endpoint: str, body: dict | None) -> Any:
        """POST to one server; its JSON answer (None when empty), or `WeightSyncError` naming URL and answer."""
        import httpx2

        url = root + endpoint
        try:
            response = client.post(url, json=body)
        except httpx2.HTTPError as e:
            raise WeightSyncError(f"weight sync: POST {url}: no answer ({type(e).__name__}: {e}); is the server "
                                  "running?") from e
        if response.status_code == 404:
            raise WeightSyncError(f"weight sync: POST {url} answered HTTP 404 ({response.text[:200]}): "
                                  f"{DEV_MODE_HINT}")
        if response.status_code != 200:
            raise WeightSyncError(f"weight sync: POST {url} answered HTTP {response.status_code}: "
                                  f"{response.text[:500]}")
        try:
            return response.json() if response.content else None
        except ValueError as e:
            raise WeightSyncError(f"weight sync: POST {url} answered non-JSON: {response.text[:300]!r}") from e


def _count(result: Any) -> int | None:
    """A worker's tensor count (vLLM sends non-dict results as text: "123")."""
    try:
        return int(result)
    except (TypeError, ValueError):
        return None
