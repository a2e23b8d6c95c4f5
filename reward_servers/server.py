"""The one gRPC server core every reward model runs behind.

- Dynamic batching: concurrent Score calls wait up to ``max_wait_ms`` to share one model call of at most
  ``max_batch_size`` images (calls with the same image size and want_grad are grouped).
- Backpressure: at most ``max_queue`` requests are admitted at once; more are answered RESOURCE_EXHAUSTED
  instead of growing a queue without end.
- Deadlines: a request whose deadline passed while queued is dropped before the model sees it.
- Validation: shape, dtype, byte count, NaN/inf, values outside [0, 1], prompt count, empty batch ->
  INVALID_ARGUMENT naming the problem; want_grad on a non-differentiable reward -> FAILED_PRECONDITION.
- Security: binds 127.0.0.1 unless told otherwise; optional bearer token (UNAUTHENTICATED without it) and TLS.
- grpc.health.v1 on every server; SIGTERM/SIGINT finish in-flight work before exiting.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tailorpo._proto import reward_pb2, reward_pb2_grpc
from tailorpo.rewards.base import RewardInputError, RewardModel, validate_reward_input
from tailorpo.rewards.wire import PROTOCOL_VERSION, WireError, tensor_from_proto, tensor_to_proto

log = logging.getLogger("tailorpo.reward_server")
SERVICE_NAME = "tailorpo.reward.v1.RewardService"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (printed at start)
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_message_mb: int = 256  # a batch of 64 512x512 float32 images is 192 MiB
    workers: int = 16
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    grace_s: float = 30.0


@dataclass
class _Request:
    images: torch.Tensor
    prompts: list[str]
    want_grad: bool
    deadline: float | None  # time.monotonic() by which the caller stops waiting
    done: threading.Event = field(default_factory=threading.Event)
    scores: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    batch_size: int = 0
    error: Exception | None = None


class QueueFull(Exception):
    pass


class Batcher:
    """Groups concurrent requests into model calls on one worker thread (the model is not shared across
    threads, which keeps GPU memory and CUDA streams simple)."""

    def __init__(self, model: RewardModel, max_batch_size: int, max_wait_s: float, max_queue: int) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._pending: list[_Request] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: _Request) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests already queued (max_queue={self.max_queue})")
            self._pending.append(request)
            self._cond.notify_all()

    def stop(self) -> None:
        """Finish what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def _take_batch(self) -> list[_Request]:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return []
            first = self._pending[0]
            key = (first.want_grad, tuple(first.images.shape[1:]))
            wait_until = time.monotonic() + self.max_wait_s
            while not self._stopping:
                same = [r for r in self._pending if (r.want_grad, tuple(r.images.shape[1:])) == key]
                if sum(len(r.prompts) for r in same) >= self.max_batch_size or time.monotonic() >= wait_until:
                    break
                self._cond.wait(timeout=max(wait_until - time.monotonic(), 0))
            batch, size = [], 0
            for r in [r for r in self._pending if (r.want_grad, tuple(r.images.shape[1:])) == key]:
                if batch and size + len(r.prompts) > self.max_batch_size:
                    break
                batch.append(r)
                size += len(r.prompts)
            for r in batch:
                self._pending.remove(r)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            now = time.monotonic()
            live = []
            for r in batch:
                if r.deadline is not None and now > r.deadline:
                    r.error = TimeoutError("deadline passed while queued")
                    r.done.set()
                else:
                    live.append(r)
            if live:
                self._score(live)

    def _score(self, batch: list[_Request]) -> None:
        try:
            out = self.model.score(
                torch.cat([r.images for r in batch]), [p for r in batch for p in r.prompts], batch[0].want_grad
            )
        except Exception as err:  # noqa: BLE001 - every waiting caller must hear about it
            log.exception("model call failed")
            for r in batch:
                r.error = err
                r.done.set()
            return
        start = 0
        for r in batch:
            n = len(r.prompts)
            r.scores = out.scores[start : start + n]
            r.grad = None if out.grad is None else out.grad[start : start + n]
            r.batch_size = len(out.scores)
            start += n
            r.done.set()


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, model: RewardModel, config: ServerConfig, score_notes: str = "") -> None:
        self.model = model
        self.config = config
        self.score_notes = score_notes
        self.batcher = Batcher(model, config.max_batch_size, config.max_wait_ms / 1000, config.max_queue)

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self.config.token is None:
            return
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {self.config.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization'")

    def Info(self, request: reward_pb2.InfoRequest, context: grpc.ServicerContext) -> reward_pb2.InfoResponse:
        self._authorize(context)
        return reward_pb2.InfoResponse(
            name=self.model.name,
            model_id=getattr(self.model, "model_id", self.model.name),
            differentiable=self.model.differentiable,
            image_size=getattr(self.model, "image_size", 0),
            score_notes=self.score_notes,
            max_batch_size=self.config.max_batch_size,
            protocol_version=PROTOCOL_VERSION,
        )

    def Score(self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext) -> reward_pb2.ScoreResponse:
        self._authorize(context)
        try:
            images = tensor_from_proto(request.images, "images").float()
            prompts = list(request.prompts)
            validate_reward_input(images, prompts)
        except (WireError, RewardInputError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if request.want_grad and not self.model.differentiable:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"reward {self.model.name!r} is not differentiable; call Score without want_grad",
            )
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        job = _Request(images, prompts, request.want_grad, deadline)
        try:
            self.batcher.submit(job)
        except QueueFull as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {err}; retry with backoff")
        if not job.done.wait(timeout=remaining):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the batch was scored")
        if isinstance(job.error, TimeoutError):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(job.error))
        if job.error is not None:
            context.abort(grpc.StatusCode.INTERNAL, f"reward model failed: {job.error}")
        response = reward_pb2.ScoreResponse(scores=job.scores.tolist(), batch_size=job.batch_size)
        if job.grad is not None:
            response.grad.CopyFrom(tensor_to_proto(job.grad))
        return response


@dataclass
class RunningServer:
    server: grpc.Server
    servicer: RewardServicer
    health: health.HealthServicer
    address: str

    def stop(self, grace_s: float) -> None:
        """Refuse new work, let in-flight calls finish (up to ``grace_s``), then stop the batcher."""
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace_s).wait()
        self.servicer.batcher.stop()


def start_server(model: RewardModel, config: ServerConfig, score_notes: str = "") -> RunningServer:
    max_bytes = config.max_message_mb * 2**20
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers),
        options=[("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)],
    )
    servicer = RewardServicer(model, config, score_notes)
    reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert or config.tls_key:
        if not (config.tls_cert and config.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    for service in (SERVICE_NAME, ""):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, servicer, health_servicer, f"{config.host}:{port}")


def serve_forever(model: RewardModel, config: ServerConfig, score_notes: str = "") -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Prints the bound address first."""
    running = start_server(model, config, score_notes)
    print(f"reward server {model.name!r} listening on {running.address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop(config.grace_s)
    print("reward server stopped", flush=True)
