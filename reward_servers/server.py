"""The one gRPC server core every reward model runs behind.

- Dynamic batching: concurrent Score calls wait up to ``max_wait_ms`` to share one model call of at most
  ``max_batch_size`` images (calls with the same image size and want_grad are grouped).
- Backpressure: at most ``max_queue`` Score requests are admitted at once (queued or being scored); more
  are answered RESOURCE_EXHAUSTED instead of growing a queue without end; while the queue is full an
  interceptor answers so before grpc reads the request, so overload costs no receiving and parsing. Each
  admitted call holds one handler thread while it waits, so the thread pool has ``max_queue + HEADROOM``
  threads (the headroom answers health checks, Info and the RESOURCE_EXHAUSTED replies themselves) and
  grpc's ``maximum_concurrent_rpcs`` is the same number, so grpc answers RESOURCE_EXHAUSTED itself beyond
  it rather than parking calls in its own unbounded queue.
- Deadlines and cancellation: a call whose deadline already passed is refused up front; a caller that
  gives up (deadline or cancel) frees its queue slot at once and is never scored.
- Validation: shape, dtype, byte count, NaN/inf, values outside [0, 1], prompt count, empty batch ->
  INVALID_ARGUMENT naming the problem; want_grad on a non-differentiable reward -> FAILED_PRECONDITION; a
  model returning the wrong number of scores, a wrongly shaped gradient or NaN/inf -> INTERNAL naming it.
- Security: binds 127.0.0.1 unless told otherwise and refuses a port another process holds (no
  SO_REUSEPORT); optional bearer token (UNAUTHENTICATED without it), checked by an interceptor before grpc
  reads the request, so an unauthenticated caller cannot make the server receive or parse up to
  ``max_message_mb``; TLS, and mutual TLS when a client CA is given. The grpc.health.v1 service is
  deliberately unauthenticated so load balancers and probes need no secret; it reveals only SERVING /
  NOT_SERVING. Every other method, including any service added later, needs the token.
- SIGTERM/SIGINT finish in-flight work before exiting; calls arriving during shutdown get UNAVAILABLE.
"""

from __future__ import annotations

import hmac
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tailorpo._proto import reward_pb2, reward_pb2_grpc
from tailorpo.rewards.base import RewardInputError, RewardModel, validate_reward_input
from tailorpo.rewards.service import ServerConfig, bearer_metadata
from tailorpo.rewards.wire import PROTOCOL_VERSION, WireError, tensor_from_proto, tensor_to_proto

log = logging.getLogger("tailorpo.reward_server")
SERVICE_NAME = "tailorpo.reward.v1.RewardService"
HEADROOM = 8  # handler threads beyond max_queue: health, Info and fast rejections never wait for a thread
HEALTH_PREFIX = "/grpc.health.v1.Health/"  # the only methods served without the token
SCORE_METHOD = f"/{SERVICE_NAME}/Score"


@dataclass(eq=False)  # identity: a generated __eq__ in _pending.remove(r) compares images and raises on mixed shapes
class _Request:
    images: torch.Tensor
    prompts: list[str]
    want_grad: bool
    deadline: float | None  # time.monotonic() by which the caller stops waiting
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # the caller gave up: it no longer counts against max_queue
    scores: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    batch_size: int = 0
    error: Exception | None = None

    def fail(self, error: Exception) -> None:
        self.error = error
        self.done.set()


class QueueFull(Exception):
    """max_queue requests are already admitted (RESOURCE_EXHAUSTED: retry later)."""


class BatcherUnavailable(Exception):
    """The batcher is shutting down or its worker died (UNAVAILABLE: try another server)."""


class Cancelled(Exception):
    """The caller cancelled before its request was scored."""


class Batcher:
    """Groups concurrent requests into model calls on one worker thread (the model is not shared across
    threads, which keeps GPU memory and CUDA streams simple)."""

    def __init__(
        self, model: RewardModel, max_batch_size: int, max_wait_s: float, max_queue: int,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.on_failure = on_failure  # e.g. health -> NOT_SERVING, so load balancers and supervisors react
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._pending: list[_Request] = []  # only live requests: cancel() removes the others at once
        self._in_flight: list[_Request] = []  # the batch the model is scoring now
        self._cond = threading.Condition()
        self._stopping = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: _Request) -> None:
        with self._cond:
            if self._stopping:
                raise BatcherUnavailable("server is shutting down")
            if self._failure is not None or not self._thread.is_alive():  # _failure: set before the thread ends
                raise BatcherUnavailable(f"the reward batcher is not running (it failed: {self._failure!r})")
            admitted = self._admitted()
            if admitted >= self.max_queue:
                raise QueueFull(f"{admitted} requests already admitted (max_queue={self.max_queue})")
            self._pending.append(request)
            self._cond.notify_all()

    def full(self) -> bool:
        """Whether ``submit`` would refuse now: a cheap look before a request is even read."""
        with self._cond:
            return self._admitted() >= self.max_queue

    def _admitted(self) -> int:
        """Requests queued or being scored whose callers still wait (the caller holds ``_cond``)."""
        return len(self._pending) + sum(not (r.cancelled or r.done.is_set()) for r in self._in_flight)

    def cancel(self, request: _Request) -> None:
        """The caller gave up: free its slot now rather than when the batcher would reach it."""
        with self._cond:
            request.cancelled = True
            if request in self._pending:
                self._pending.remove(request)
                request.fail(Cancelled("cancelled by the caller"))
                self._cond.notify_all()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued, then end the worker; never hang shutdown on a stuck model call."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("reward batcher still busy after %.0f s; exiting without it", timeout_s)

    def _take_batch(self) -> list[_Request] | None:
        """The next batch (possibly empty if its requests were cancelled); None once stopping and idle."""
        with self._cond:
            self._in_flight = []
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            key = (self._pending[0].want_grad, tuple(self._pending[0].images.shape[1:]))
            wait_until = time.monotonic() + self.max_wait_s
            while not self._stopping:
                same = [r for r in self._pending if (r.want_grad, tuple(r.images.shape[1:])) == key]
                if not same or sum(len(r.prompts) for r in same) >= self.max_batch_size:
                    break
                if time.monotonic() >= wait_until:
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
            self._in_flight = batch
            return batch

    def _run(self) -> None:
        """Any escaped exception fails every waiting caller instead of silently leaving them to time out."""
        try:
            while (batch := self._take_batch()) is not None:
                now = time.monotonic()
                for r in batch:
                    if r.deadline is not None and now > r.deadline:
                        r.fail(TimeoutError("deadline passed while queued"))
                live = [r for r in batch if not r.done.is_set()]
                if live:
                    self._score(live)
        except BaseException as err:  # noqa: BLE001 - reported to every caller, then the thread ends
            log.exception("reward batcher crashed")
            with self._cond:
                self._failure = err
                for r in self._pending + self._in_flight:
                    if not r.done.is_set():
                        r.fail(BatcherUnavailable(f"the reward batcher crashed: {err!r}"))
                self._pending, self._in_flight = [], []
            if self.on_failure is not None:
                self.on_failure()

    def _score(self, batch: list[_Request]) -> None:
        images = torch.cat([r.images for r in batch])
        want_grad = batch[0].want_grad
        try:
            out = self.model.score(images, [p for r in batch for p in r.prompts], want_grad)
            if tuple(out.scores.shape) != (len(images),):  # slicing a short result would misalign callers
                raise RuntimeError(f"model returned scores of shape {tuple(out.scores.shape)} for "
                                   f"{len(images)} images")
            if want_grad and (out.grad is None or out.grad.shape != images.shape):
                got = None if out.grad is None else tuple(out.grad.shape)
                raise RuntimeError(f"model returned a gradient of shape {got} for images {tuple(images.shape)}")
            if want_grad and not torch.isfinite(out.grad).all():  # scores: RewardModel.score checks them
                raise RuntimeError("model returned a non-finite gradient (NaN or inf): it would reach the latents")
        except Exception as err:  # noqa: BLE001 - every waiting caller must hear about it
            log.exception("model call failed")
            for r in batch:
                r.fail(err)
            return
        start = 0
        for r in batch:
            n = len(r.prompts)
            r.scores = out.scores[start : start + n]
            r.grad = None if out.grad is None else out.grad[start : start + n]
            r.batch_size = len(out.scores)
            start += n
            r.done.set()


_ERROR_CODES = {
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    BatcherUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def _refusal(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler answering ``code`` without reading the request: grpc hands a streaming-request handler the
    request unread, where a unary handler would first receive the whole message and parse it."""

    def refuse(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> None:
        context.abort(code, details)

    return grpc.stream_unary_rpc_method_handler(refuse)


_UNAUTHENTICATED = _refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization'")


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Checks the token from the call's metadata before any handler runs: a caller without it cannot make the
    server receive or parse a request body. Health checks pass without it (see the module docstring)."""

    def __init__(self, token: str) -> None:
        self._key, expected = bearer_metadata(token)
        self._expected = expected.encode()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method.startswith(HEALTH_PREFIX):
            return continuation(handler_call_details)
        got = dict(handler_call_details.invocation_metadata).get(self._key, "")
        # constant time, so the token cannot be guessed byte by byte from response times
        if hmac.compare_digest(got.encode(), self._expected):
            return continuation(handler_call_details)
        return _UNAUTHENTICATED


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Refuses Score while the queue is full before grpc reads the request, so an overloaded server spends
    nothing on receiving and parsing requests it cannot take (``Batcher.submit`` still has the last word)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self._busy = _refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: max_queue={batcher.max_queue} "
                             "requests already admitted; retry with backoff")

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method == SCORE_METHOD and self.batcher.full():
            return self._busy
        return continuation(handler_call_details)


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(
        self, model: RewardModel, config: ServerConfig, score_notes: str = "",
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.score_notes = score_notes
        self.batcher = Batcher(model, config.max_batch_size, config.max_wait_ms / 1000, config.max_queue, on_failure)

    def Info(self, request: reward_pb2.InfoRequest, context: grpc.ServicerContext) -> reward_pb2.InfoResponse:
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
        try:
            images = tensor_from_proto(request.images, "images").float()
            prompts = list(request.prompts)
            validate_reward_input(images, prompts)
            self.model.check_prompts(prompts)
        except (WireError, RewardInputError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if request.want_grad and not self.model.differentiable:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"reward {self.model.name!r} is not differentiable; call Score without want_grad",
            )
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request was queued")
        job = _Request(images, prompts, request.want_grad, None if remaining is None else time.monotonic() + remaining)
        try:
            self.batcher.submit(job)
        except QueueFull as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {err}; retry with backoff")
        except BatcherUnavailable as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        if not context.add_callback(lambda: self.batcher.cancel(job)):  # the call already ended
            self.batcher.cancel(job)
            context.abort(grpc.StatusCode.CANCELLED, "the call ended before the request was queued")
        if not job.done.wait(timeout=remaining):
            self.batcher.cancel(job)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the batch was scored")
        if type(job.error) in _ERROR_CODES:
            context.abort(_ERROR_CODES[type(job.error)], str(job.error))
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
        self.servicer.batcher.stop(timeout_s=grace_s)


def start_server(
    model: RewardModel, config: ServerConfig, score_notes: str = "", on_failure: Callable[[], None] | None = None
) -> RunningServer:
    """Raises OSError naming the address when it cannot be bound (e.g. another server already holds it). If
    the batcher crashes, health turns NOT_SERVING and ``on_failure`` runs."""
    max_bytes = config.max_message_mb * 2**20
    threads = config.max_queue + HEADROOM
    health_servicer = health.HealthServicer()

    def not_serving() -> None:
        for service in (SERVICE_NAME, ""):
            health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if on_failure is not None:
            on_failure()

    servicer = RewardServicer(model, config, score_notes, not_serving)
    authentication = [] if config.token is None else [BearerTokenInterceptor(config.token)]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reward-rpc"),
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),  # grpc's default 1 would let a second server share (and split) the port
        ],
        maximum_concurrent_rpcs=threads,  # beyond it grpc answers RESOURCE_EXHAUSTED instead of queueing
        interceptors=[*authentication, AdmissionInterceptor(servicer.batcher)],  # in this order
    )
    reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert:
            client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
                root_certificates=client_ca, require_client_auth=client_ca is not None,
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind ..." does not say why; older grpc returned 0 instead
        port = 0
    if port == 0:
        servicer.batcher.stop(timeout_s=1.0)
        raise OSError(f"could not bind {address}: already in use (another server?) or not a local address")
    server.start()
    for service in (SERVICE_NAME, ""):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, servicer, health_servicer, f"{config.host}:{port}")


def serve_forever(model: RewardModel, config: ServerConfig, score_notes: str = "") -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Prints the bound address first; a port that
    cannot be bound ends the process with exit code 2 and one line naming the address (no traceback). A
    crashed batcher ends it with exit code 1, so a supervisor (``reward.launch``'s owner actor) restarts it."""
    stop, crashed = threading.Event(), threading.Event()

    def crash() -> None:
        crashed.set()
        stop.set()

    try:
        running = start_server(model, config, score_notes, on_failure=crash)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(f"reward server {model.name!r} listening on {running.address}", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop(config.grace_s)
    if crashed.is_set():
        print("error: the reward batcher crashed (see the log above); exiting for a restart", file=sys.stderr)
        raise SystemExit(1)
    print("reward server stopped", flush=True)
