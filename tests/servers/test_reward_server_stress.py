"""A real reward server process under hostile input (fuzzing) and sustained load (benchmarks/reward_load.py)."""

from __future__ import annotations

import math
import random
from collections import Counter
from concurrent import futures

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tailorpo._proto import reward_pb2
from tailorpo.rewards import build_reward
from tailorpo.rewards.grpc_client import GrpcReward
from tailorpo.rewards.wire import WIRE_DTYPES, WireError, tensor_from_proto, tensor_to_proto
from tests.servers.test_reward_server import images, reward_server

SCORE, INFO = "/tailorpo.reward.v1.RewardService/Score", "/tailorpo.reward.v1.RewardService/Info"
HEALTH = "/grpc.health.v1.Health/Check"
MESSAGES = {SCORE: reward_pb2.ScoreRequest, INFO: reward_pb2.InfoRequest, HEALTH: health_pb2.HealthCheckRequest}
UNPARSABLE = "Exception deserializing request!"  # grpc's own answer (INTERNAL) to bytes that are no message
ITERATIONS = 300  # of each kind: raw bytes, mutated requests, random field values
DIMS = [-(2**62), -1, 0, 1, 2, 3, 4, 7, 2**31, 2**40, 2**62]
DTYPES = [*WIRE_DTYPES, "", "int8", "float64", "FLOAT32", "float32\0", "\u00e9"]
SPECIAL = [float("nan"), float("inf"), -float("inf"), -0.0, 1.0, 1.5, -1e-3, 1e30, 0.5]


def random_text(rng: random.Random) -> str:
    """Any code point a protobuf string may hold (no surrogates), of any length up to 300."""
    chars = [chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0xD800), rng.randrange(0xE000, 0x110000)]))
             for _ in range(rng.choice([0, 1, 5, 300]))]
    return "".join(chars)


def random_tensor(rng: random.Random) -> reward_pb2.Tensor:
    """Random shapes and dtypes; the byte count right for the shape (small shapes) or random; values in
    [0, 1], sometimes with one special value (NaN, inf, out of range)."""
    if rng.random() < 0.6:  # plausible: (N, 3, H, W) with small sides, so the data can match the shape
        shape = [rng.randint(0, 3), rng.choice([3, 3, 3, 3, 3, 3, 1, 4]), rng.randint(1, 9), rng.randint(1, 9)]
    else:
        shape = [rng.choice(DIMS) for _ in range(rng.randint(0, 6))]
    dtype = rng.choice(list(WIRE_DTYPES)) if rng.random() < 0.7 else rng.choice(DTYPES)
    count = math.prod(shape) if all(0 <= d <= 9 for d in shape) else rng.randint(0, 64)
    values = torch.tensor([rng.random() for _ in range(count)])
    if count and rng.random() < 0.2:
        values[rng.randrange(count)] = rng.choice(SPECIAL)
    data = values.to(WIRE_DTYPES.get(dtype, torch.float32)).view(torch.uint8).numpy().tobytes()
    if rng.random() < 0.1:  # wrong byte count
        data = data[: rng.randint(0, len(data))] if data and rng.random() < 0.5 else data + rng.randbytes(3)
    return reward_pb2.Tensor(data=data, shape=shape, dtype=dtype)


def random_request(rng: random.Random) -> reward_pb2.ScoreRequest:
    tensor = random_tensor(rng)
    n = tensor.shape[0] if len(tensor.shape) and 0 <= tensor.shape[0] <= 9 else 1
    count = n if rng.random() < 0.9 else rng.randint(0, 5)  # mostly one prompt per image
    return reward_pb2.ScoreRequest(images=tensor, prompts=[random_text(rng) for _ in range(count)],
                                   want_grad=rng.random() < 0.3)


def mutate(rng: random.Random, payload: bytes) -> bytes:
    """A valid request with a few bytes flipped, cut, inserted or a varint overwritten with a huge one."""
    data = bytearray(payload)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        kind = rng.randrange(4)
        if kind == 0 and at < len(data):
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data = data[:at]
        elif kind == 2:
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        else:
            data[at:at] = b"\xff" * 9 + b"\x01"  # a 10-byte varint: 2**64 - 1
    return bytes(data)


def expected_scores(request: reward_pb2.ScoreRequest) -> torch.Tensor | None:
    """The in-process colorfulness of a request the server must score, None for one it must refuse."""
    try:
        x = tensor_from_proto(request.images, "images").float()
        return build_reward("colorfulness").score(x, list(request.prompts), request.want_grad).scores
    except (WireError, ValueError):
        return None


def check_answer(method: str, payload: bytes, response: bytes | None, error: grpc.RpcError | None) -> str:
    """The server's answer to one fuzzed call must be an error status it documents, or a response that is
    right for the request; returns the status name."""
    if error is not None:
        code, details = error.code(), error.details() or ""
        allowed = {SCORE: {grpc.StatusCode.INVALID_ARGUMENT}, INFO: set(), HEALTH: {grpc.StatusCode.NOT_FOUND}}
        assert code in allowed[method] or (code == grpc.StatusCode.INTERNAL and details == UNPARSABLE), (
            method, code, details, payload[:200])
        if code == grpc.StatusCode.INTERNAL:  # only for bytes that are not a message
            with pytest.raises(DecodeError):
                MESSAGES[method].FromString(payload)
        elif code == grpc.StatusCode.INVALID_ARGUMENT:  # only for what the reward itself refuses
            assert expected_scores(reward_pb2.ScoreRequest.FromString(payload)) is None, (details, payload[:200])
        return code.name
    if method == SCORE:
        request, answer = reward_pb2.ScoreRequest.FromString(payload), reward_pb2.ScoreResponse.FromString(response)
        expected = expected_scores(request)
        assert expected is not None, ("scored a request the in-process reward refuses", payload[:200])
        torch.testing.assert_close(torch.tensor(list(answer.scores)), expected, rtol=1e-4, atol=1e-3)
        assert list(answer.grad.shape) == (list(request.images.shape) if request.want_grad else [])
    return "OK"


def test_fuzzed_requests_get_errors_or_right_answers_and_the_server_stays_healthy():
    """Random bytes, mutated valid requests and random field values (shapes, dtypes, byte counts, NaN,
    huge and negative dims, any prompt text), sent 4 at a time so valid ones share batches: each call is
    answered with a documented error or the in-process reward's scores, the process never dies, and it
    still serves correct answers afterwards."""
    rng = random.Random(0)
    valid = reward_pb2.ScoreRequest(images=tensor_to_proto(images(2, size=4)), prompts=["a cat", "a dog"])
    sizes = [0, 1, 7, 64, 4096]
    calls = [(rng.choice([SCORE, INFO, HEALTH]), rng.randbytes(rng.choice(sizes))) for _ in range(ITERATIONS)]
    calls += [(SCORE, mutate(rng, valid.SerializeToString())) for _ in range(ITERATIONS)]
    calls += [(SCORE, random_request(rng).SerializeToString()) for _ in range(ITERATIONS)]
    rng.shuffle(calls)
    seen: Counter[str] = Counter()  # "method status": calls
    with reward_server("colorfulness", "--max-wait-ms", "10") as (address, proc):
        channel = grpc.insecure_channel(address)
        stubs = {m: channel.unary_unary(m) for m in (SCORE, INFO, HEALTH)}  # no serializers: raw bytes

        def send(call: tuple[str, bytes]) -> tuple[bytes | None, grpc.RpcError | None]:
            try:
                return stubs[call[0]](call[1], timeout=30), None
            except grpc.RpcError as err:
                return None, err

        with futures.ThreadPoolExecutor(4) as pool:
            for (method, payload), (response, error) in zip(calls, pool.map(send, calls), strict=True):
                seen[f"{method.rsplit('/', 1)[1]} {check_answer(method, payload, response, error)}"] += 1
        assert proc.poll() is None
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        x = images(3, seed=11)
        torch.testing.assert_close(GrpcReward([address]).score(x, ["a", "b", "c"], want_grad=True).scores,
                                   build_reward("colorfulness").score(x, ["a", "b", "c"]).scores)
    # the fuzzing reached every kind of answer, not only the parser's
    assert min(seen[f"Score {s}"] for s in ("OK", "INVALID_ARGUMENT", "INTERNAL")) >= 50, seen



@pytest.mark.slow
def test_load_quick_mode_loses_nothing_and_pushes_back():
    """benchmarks/reward_load.py --quick: 16 clients for 10 s, then 128 against a queue of 32."""
    from reward_load import QUICK_S, run_load

    result = run_load(QUICK_S)
    for phase in (result.sustained, result.overload):
        assert phase.ok > 0 and phase.lost == 0 and phase.mismatched == 0, phase
    assert result.min_gap > 1e-3  # a response with another request's scores would have been caught
    assert not result.sustained.refused  # 16 callers fit in the queue
    assert sum(result.overload.refused.values()) > 0  # 128 do not: RESOURCE_EXHAUSTED, not a longer queue
    rss = result.sustained.rss_mib
    assert max(rss) - rss[0] < 256, rss  # flat: a leak of one request (1.2 MB) per call would add > 1 GB
    assert result.healthy_after
