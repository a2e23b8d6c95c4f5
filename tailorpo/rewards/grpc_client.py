"""The gRPC reward client: one more ``RewardModel``, so samplers and guidance use remote rewards unchanged.

- Sends images at the server's native size; the resize runs here as a differentiable op, so the gradient
  the server returns for the small image is carried back to the full-size image (and on to the latents).
- Several addresses per reward spread the load round-robin; UNAVAILABLE (a server restarting, a dropped
  connection) and RESOURCE_EXHAUSTED (a busy server) are retried on the next address with jittered
  exponential backoff, so clients refused together do not come back together. A message over the size
  limit is also RESOURCE_EXHAUSTED but would fail again everywhere, so it is not retried.
- At start-up every reachable address must report the same reward, model, image size, differentiability
  and protocol version: round-robin over mismatched servers would silently mix two reward functions.
- ``WeightedSum`` combines several rewards into one.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from pathlib import Path

import grpc
import torch

from tailorpo._proto import reward_pb2, reward_pb2_grpc
from tailorpo.rewards.base import RewardModel, RewardOutput
from tailorpo.rewards.images import resize_and_center_crop
from tailorpo.rewards.service import (
    BACKOFF_S,
    MAX_MESSAGE_MB,
    RETRIES,
    TIMEOUT_S,
    backoff_delay_s,
    bearer_metadata,
    check_client_tls,
)
from tailorpo.rewards.wire import PROTOCOL_VERSION, WireError, tensor_from_proto, tensor_to_proto

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
MAX_MESSAGE_BYTES = MAX_MESSAGE_MB * 2**20
# gRPC's own reconnect backoff grows to 120 s by default: a restarted server would sit unused that long
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


class RewardServerError(RuntimeError):
    """A reward server refused or failed a call; the message names the address and the status."""


def channel_credentials(
    tls_ca: str | None, client_cert: str | None = None, client_key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS that trusts only ``tls_ca`` (not the system roots), presenting the client certificate to servers
    that require one (``--tls-client-ca``); None: plaintext. One place, so reward clients and the launched
    servers' health probes connect alike."""
    check_client_tls(tls_ca, client_cert, client_key)
    if not tls_ca:
        return None
    return grpc.ssl_channel_credentials(Path(tls_ca).read_bytes(), client_key and Path(client_key).read_bytes(),
                                        client_cert and Path(client_cert).read_bytes())


class GrpcReward(RewardModel):
    def __init__(
        self,
        addresses: list[str],
        timeout_s: float = TIMEOUT_S,
        retries: int = RETRIES,
        backoff_s: float = BACKOFF_S,
        token: str | None = None,
        tls_ca: str | None = None,
        wire_dtype: str = "float32",
        connect_timeout_s: float = 10.0,
        tls_client_cert: str | None = None,
        tls_client_key: str | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("GrpcReward needs at least one server address")
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.wire_dtype = wire_dtype
        self._metadata = (bearer_metadata(token),) if token else ()
        credentials = channel_credentials(tls_ca, tls_client_cert, tls_client_key)
        self._tls = credentials is not None
        if credentials is not None:
            self._channels = [grpc.secure_channel(a, credentials, CHANNEL_OPTIONS) for a in self.addresses]
        else:
            self._channels = [grpc.insecure_channel(a, CHANNEL_OPTIONS) for a in self.addresses]
        self._stubs = [reward_pb2_grpc.RewardServiceStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))
        self._lock = threading.Lock()
        info = self._info(connect_timeout_s)
        self.name = info.name
        self.model_id = info.model_id
        self.differentiable = info.differentiable
        self.image_size = info.image_size
        self.info = info

    def _info(self, connect_timeout_s: float) -> reward_pb2.InfoResponse:
        """Fail fast, naming the addresses, when no server answers or the servers disagree; the channels
        are closed on failure so a refused client leaks no connections or threads."""
        ready = [grpc.channel_ready_future(c) for c in self._channels]  # all connect in parallel
        try:
            return self._agreed_info(ready, connect_timeout_s)
        except BaseException:
            self.close()
            raise
        finally:
            for future in ready:
                future.cancel()

    def _agreed_info(self, ready: list[grpc.Future], connect_timeout_s: float) -> reward_pb2.InfoResponse:
        deadline = time.monotonic() + connect_timeout_s
        answers, errors = [], []
        for address, stub, future in zip(self.addresses, self._stubs, ready, strict=True):
            try:
                future.result(timeout=max(deadline - time.monotonic(), 0))
                answers.append((address, stub.Info(reward_pb2.InfoRequest(), timeout=connect_timeout_s,
                                                   metadata=self._metadata)))
            except grpc.FutureTimeoutError:
                # grpc does not say why a TLS handshake failed: it looks like an unreachable server
                hint = " (or the TLS handshake failed: check tls_ca and the client certificate)" if self._tls else ""
                errors.append(f"{address}: unreachable within {connect_timeout_s:.0f}s{hint}")
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:  # reachable but refusing: misconfigured
                    raise RewardServerError(f"{address}: {err.code().name} {err.details()}") from None
                errors.append(f"{address}: {err.code().name} {err.details()}")
        if not answers:
            raise RewardServerError("no reward server answered: " + "; ".join(errors))
        first_address, first = answers[0]
        for address, info in answers:
            if info.protocol_version != PROTOCOL_VERSION:
                raise RewardServerError(f"{address} speaks protocol {info.protocol_version!r}; this client "
                                        f"speaks {PROTOCOL_VERSION!r}")
            if _identity(info) != _identity(first):
                raise RewardServerError(f"{address} serves {_identity(info)} but {first_address} serves "
                                        f"{_identity(first)}; all addresses of one reward must serve the same model")
        return first

    def _call(self, request: reward_pb2.ScoreRequest) -> tuple[str, reward_pb2.ScoreResponse]:
        """(address that answered, response); retries sleep only between attempts, never after the last."""
        last_error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(backoff_delay_s(attempt, self.backoff_s) * random.uniform(0.5, 1.5))
            with self._lock:
                index = next(self._next)
            address = self.addresses[index]
            try:
                return address, self._stubs[index].Score(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as err:
                status = f"{address}: {err.code().name}: {err.details()}"
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (err.details() or ""):
                    raise RewardServerError(f"{status}; the request exceeds the gRPC message size limit, score "
                                            "fewer images per call (a smaller batch)") from None
                if err.code() not in RETRYABLE:
                    raise RewardServerError(status) from None
                last_error = status
        raise RewardServerError(f"gave up after {self.retries + 1} attempts; last: {last_error}")

    def _score(self, images: torch.Tensor, prompts: list[str], want_grad: bool) -> RewardOutput:
        """Scores and gradient come back on ``images``' device; the wire gradient (float32, CPU) is moved
        to the resized tensor's device and dtype before autograd chains it through the resize."""
        full = images.clone().requires_grad_(want_grad)
        with torch.enable_grad():
            native = resize_and_center_crop(full, self.image_size) if self.image_size else full
        request = reward_pb2.ScoreRequest(
            images=tensor_to_proto(native.clamp(0, 1), self.wire_dtype), prompts=prompts, want_grad=want_grad
        )
        address, response = self._call(request)
        if len(response.scores) != len(prompts):
            raise RewardServerError(f"{address}: returned {len(response.scores)} scores for {len(prompts)} images")
        scores = torch.tensor(list(response.scores), dtype=torch.float32, device=images.device)
        if not want_grad:
            return RewardOutput(scores)
        try:
            grad_native = tensor_from_proto(response.grad, "grad")
        except WireError as err:
            raise RewardServerError(f"{address}: returned an invalid gradient: {err}") from None
        if grad_native.shape != native.shape:
            raise RewardServerError(f"{address}: returned a gradient of shape {tuple(grad_native.shape)} for "
                                    f"images of shape {tuple(native.shape)}")
        grad_native = grad_native.to(native.device, native.dtype)
        if native is full:
            return RewardOutput(scores, grad_native)
        (grad,) = torch.autograd.grad(native, full, grad_native)  # chain through the client-side resize
        return RewardOutput(scores, grad.to(images.device))

    def close(self) -> None:
        """Close the channels (their connections and polling threads)."""
        for channel in self._channels:
            channel.close()


def _identity(info: reward_pb2.InfoResponse) -> str:
    """What must agree between the addresses of one reward."""
    return (f"name={info.name!r} model_id={info.model_id!r} image_size={info.image_size} "
            f"differentiable={info.differentiable}")


class WeightedSum(RewardModel):
    """sum_i w_i r_i(c, image): differentiable when every component is."""

    def __init__(self, components: list[tuple[RewardModel, float]]) -> None:
        self.components = components
        self.name = "+".join(f"{w:g}*{r.name}" for r, w in components)
        self.differentiable = all(r.differentiable for r, _ in components)

    def _score(self, images: torch.Tensor, prompts: list[str], want_grad: bool) -> RewardOutput:
        outputs = [(r.score(images, prompts, want_grad), w) for r, w in self.components]
        scores = sum(w * out.scores for out, w in outputs)
        grad = sum(w * out.grad for out, w in outputs) if want_grad else None
        return RewardOutput(scores, grad)

    def close(self) -> None:
        """Close every component (their gRPC channels, for remote ones)."""
        for reward, _ in self.components:
            reward.close()
