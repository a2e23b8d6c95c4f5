"""The gRPC reward client: one more ``RewardModel``, so samplers and guidance use remote rewards unchanged.

- Sends images at the server's native size; the resize runs here as a differentiable op, so the gradient
  the server returns for the small image is carried back to the full-size image (and on to the latents).
- Several addresses per reward spread the load round-robin; UNAVAILABLE (a server restarting, a dropped
  connection) and RESOURCE_EXHAUSTED are retried with exponential backoff on the next address.
- ``WeightedSum`` combines several rewards into one.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import grpc
import torch

from tailorpo._proto import reward_pb2, reward_pb2_grpc
from tailorpo.rewards.base import RewardModel, RewardOutput
from tailorpo.rewards.images import resize_and_center_crop
from tailorpo.rewards.wire import tensor_from_proto, tensor_to_proto

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
MAX_MESSAGE_BYTES = 256 * 2**20


class RewardServerError(RuntimeError):
    """A reward server refused or failed a call; the message names the address and the status."""


class GrpcReward(RewardModel):
    def __init__(
        self,
        addresses: list[str],
        timeout_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.2,
        token: str | None = None,
        tls_ca: str | None = None,
        wire_dtype: str = "float32",
        connect_timeout_s: float = 10.0,
    ) -> None:
        if not addresses:
            raise ValueError("GrpcReward needs at least one server address")
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.wire_dtype = wire_dtype
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self._channels = [grpc.secure_channel(a, credentials, options) for a in self.addresses]
        else:
            self._channels = [grpc.insecure_channel(a, options) for a in self.addresses]
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
        """Fail fast, naming the addresses, when no server answers at start-up."""
        errors = []
        for address, channel, stub in zip(self.addresses, self._channels, self._stubs):
            try:
                grpc.channel_ready_future(channel).result(timeout=connect_timeout_s)
                return stub.Info(reward_pb2.InfoRequest(), timeout=connect_timeout_s, metadata=self._metadata)
            except grpc.FutureTimeoutError:
                errors.append(f"{address}: unreachable within {connect_timeout_s:.0f}s")
            except grpc.RpcError as err:
                errors.append(f"{address}: {err.code().name} {err.details()}")
        raise RewardServerError("no reward server answered: " + "; ".join(errors))

    def _call(self, request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
        last_error = None
        for attempt in range(self.retries + 1):
            with self._lock:
                index = next(self._next)
            try:
                return self._stubs[index].Score(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise RewardServerError(f"{self.addresses[index]}: {err.code().name}: {err.details()}") from None
                last_error = f"{self.addresses[index]}: {err.code().name}: {err.details()}"
                time.sleep(self.backoff_s * 2**attempt)
        raise RewardServerError(f"gave up after {self.retries + 1} attempts; last: {last_error}")

    def _score(self, images: torch.Tensor, prompts: list[str], want_grad: bool) -> RewardOutput:
        full = images.clone().requires_grad_(want_grad)
        with torch.enable_grad():
            native = resize_and_center_crop(full, self.image_size) if self.image_size else full
        request = reward_pb2.ScoreRequest(
            images=tensor_to_proto(native.clamp(0, 1), self.wire_dtype), prompts=prompts, want_grad=want_grad
        )
        response = self._call(request)
        scores = torch.tensor(list(response.scores), dtype=torch.float32)
        if not want_grad:
            return RewardOutput(scores)
        grad_native = tensor_from_proto(response.grad, "grad").float()
        if native is full:
            return RewardOutput(scores, grad_native)
        (grad,) = torch.autograd.grad(native, full, grad_native)  # chain through the client-side resize
        return RewardOutput(scores, grad)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


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
