"""Reward servers as real processes on loopback, spoken to over gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reward_servers import server as reward_server_module
from reward_servers.server import ServerConfig, start_server
from tailorpo._proto import reward_pb2, reward_pb2_grpc
from tailorpo.rewards import build_reward, grpc_client
from tailorpo.rewards.base import RewardModel, RewardOutput
from tailorpo.rewards.grpc_client import GrpcReward, RewardServerError, WeightedSum
from tailorpo.rewards.images import resize_and_center_crop
from tailorpo.rewards.wire import tensor_to_proto
from tests.conftest import self_signed_cert

pytestmark = pytest.mark.grpc


@contextmanager
def reward_server(name: str, *args: str, port: int = 0, env: dict | None = None, tiny: bool = True):
    """Start ``tailorpo serve-reward NAME [--tiny]`` and yield (address, process); SIGKILL it at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tailorpo.cli", "serve-reward", name, *["--tiny"] * tiny, "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )
    try:
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"server did not start: {line!r} {proc.stderr.read()}")
        yield line.rsplit(" ", 1)[-1].strip(), proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def stub(address: str) -> reward_pb2_grpc.RewardServiceStub:
    return reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(address))


def images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def colorfulness_server():
    with reward_server("colorfulness", "--max-wait-ms", "300", "--max-batch-size", "8") as (address, proc):
        yield address


@pytest.fixture(scope="module")
def jpeg_server():
    with reward_server("jpeg") as (address, proc):
        yield address


def test_info_and_loopback_bind(colorfulness_server):
    assert colorfulness_server.startswith("127.0.0.1:")
    info = stub(colorfulness_server).Info(reward_pb2.InfoRequest(), timeout=5)
    assert info.name == "colorfulness" and info.differentiable
    assert info.protocol_version == "tailorpo.reward.v1" and info.max_batch_size == 8


def test_scores_equal_the_in_process_model(colorfulness_server, jpeg_server):
    x = images(3)
    for address, name in ((colorfulness_server, "colorfulness"), (jpeg_server, "jpeg")):
        client = GrpcReward([address])
        remote = client.score(x, ["a", "b", "c"]).scores
        torch.testing.assert_close(remote, build_reward(name).score(x, ["a", "b", "c"]).scores)


def test_gradient_through_the_wire_matches_finite_differences(colorfulness_server):
    client = GrpcReward([colorfulness_server])
    x = images(2, seed=1) * 0.8 + 0.1
    out = client.score(x, ["a", "b"], want_grad=True)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    h = 1e-3
    plus = client.score(x + h * direction, ["a", "b"]).scores
    minus = client.score(x - h * direction, ["a", "b"]).scores
    numeric = (plus - minus) / (2 * h)
    torch.testing.assert_close((out.grad * direction).sum(dim=(1, 2, 3)), numeric, rtol=2e-2, atol=2e-2)


def test_client_resizes_to_the_native_size_and_chains_the_gradient():
    """A server that wants 8x8 gets 8x8; the gradient w.r.t. the 16x16 input goes through the resize."""
    with reward_server("colorfulness") as (address, _):
        client = GrpcReward([address])
        client.image_size = 8  # as a server with native size 8 would announce in Info
        x = images(1, size=16, seed=3)
        out = client.score(x, ["a"], want_grad=True)
        small = resize_and_center_crop(x, 8).clamp(0, 1)
        local = build_reward("colorfulness").score(small, ["a"], want_grad=True)
        torch.testing.assert_close(out.scores, local.scores)
        full = x.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(resize_and_center_crop(full, 8), full, local.grad)
        torch.testing.assert_close(out.grad, expected)
        assert out.grad.shape == x.shape


def test_concurrent_clients_are_batched_together(colorfulness_server):
    client = GrpcReward([colorfulness_server])
    sizes: list[int] = []

    def call(seed: int) -> None:
        request = reward_pb2.ScoreRequest(images=tensor_to_proto(images(2, seed=seed)), prompts=["a", "b"])
        sizes.append(client._stubs[0].Score(request, timeout=10).batch_size)

    threads = [threading.Thread(target=call, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(sizes) >= 4, sizes  # at least two 2-image requests shared one model call (max batch 8)


def test_interleaved_shapes_and_want_grad_are_each_scored(colorfulness_server):
    """Requests waiting together that cannot share a batch (another size, or want_grad: guidance and plain
    scoring from different samplers) are scored in turn. The batcher once crashed taking the third request
    out of its queue past the second (it compared their image tensors)."""
    client = GrpcReward([colorfulness_server])
    x = {8: images(1, size=8, seed=8), 16: images(1, size=16, seed=9)}
    calls = [(8, False), (16, False), (8, False), (8, True)]
    results: dict[int, torch.Tensor] = {}

    def call(k: int) -> None:
        size, want_grad = calls[k]
        results[k] = client.score(x[size], ["a"], want_grad=want_grad).scores

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(calls))]
    for t in threads:  # in this order into the 300 ms batching window
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    for k, (size, _) in enumerate(calls):
        torch.testing.assert_close(results[k], build_reward("colorfulness").score(x[size], ["a"]).scores)


def _bad(message: reward_pb2.ScoreRequest, address: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub(address).Score(message, timeout=10)
    return err.value


@pytest.mark.parametrize(
    "request_kwargs, expected",
    [
        (dict(images=tensor_to_proto(torch.rand(2, 4, 8, 8)), prompts=["a", "b"]), "shape"),
        (dict(images=tensor_to_proto(torch.rand(0, 3, 8, 8)), prompts=[]), "empty"),
        (dict(images=tensor_to_proto(torch.rand(2, 3, 8, 8)), prompts=["a"]), "2 images but 1 prompts"),
        (dict(images=tensor_to_proto(torch.full((1, 3, 8, 8), float("nan"))), prompts=["a"]), "NaN"),
        (dict(images=tensor_to_proto(torch.full((1, 3, 8, 8), 2.0)), prompts=["a"]), "[0, 1]"),
        (dict(images=reward_pb2.Tensor(data=b"\0" * 10, shape=[1, 3, 2, 2], dtype="float32"), prompts=["a"]),
         "needs 48"),
        (dict(images=reward_pb2.Tensor(data=b"", shape=[1, 3, 2, 2], dtype="int8"), prompts=["a"]), "dtype"),
        # no bytes needed (a zero dimension), but the other dimensions overflow torch's size arithmetic
        (dict(images=reward_pb2.Tensor(data=b"", shape=[0, 3, 2**62, 4], dtype="float32"), prompts=[]),
         "too large"),
        (dict(images=reward_pb2.Tensor(data=b"", shape=[1, 3, 2**40, 2**40], dtype="float32"), prompts=["a"]),
         "too large"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_problem(colorfulness_server, request_kwargs, expected):
    err = _bad(reward_pb2.ScoreRequest(**request_kwargs), colorfulness_server)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in err.details(), err.details()


def test_half_precision_on_the_wire(colorfulness_server):
    x = images(2, seed=4)
    for dtype in ("float16", "bfloat16"):
        request = reward_pb2.ScoreRequest(images=tensor_to_proto(x, dtype), prompts=["a", "b"])
        scores = torch.tensor(list(stub(colorfulness_server).Score(request, timeout=10).scores))
        torch.testing.assert_close(scores, build_reward("colorfulness").score(x, ["a", "b"]).scores, rtol=2e-2,
                                   atol=0.5)


def test_gradient_of_a_non_differentiable_reward_is_failed_precondition(jpeg_server):
    err = _bad(reward_pb2.ScoreRequest(images=tensor_to_proto(images(1)), prompts=["a"], want_grad=True),
               jpeg_server)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "not differentiable" in err.details()


def test_health_service(jpeg_server):
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(jpeg_server))
    for service in ("", "tailorpo.reward.v1.RewardService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def raw_code(channel: grpc.Channel, method: str, payload: bytes, metadata: tuple = ()) -> grpc.StatusCode:
    """Status of one call of ``method`` with ``payload`` sent as is (no serializer), as an attacker could."""
    try:
        channel.unary_unary(method)(payload, metadata=metadata, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def peak_memory_mib(pid: int) -> float:
    """The process's peak resident memory so far (Linux: VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def test_token_auth():
    """Everything but health needs the token, so a method added later is covered too."""
    with reward_server("jpeg", "--token-env", "RW_TOKEN", env={"RW_TOKEN": "s3cret"}) as (address, _):
        request = reward_pb2.ScoreRequest(images=tensor_to_proto(images(1)), prompts=["a"])
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub(address).Score(request, metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        with pytest.raises(grpc.RpcError) as info_err:
            stub(address).Info(reward_pb2.InfoRequest(), timeout=5)
        assert info_err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        channel, unknown = grpc.insecure_channel(address), "/tailorpo.reward.v1.RewardService/Train"
        assert raw_code(channel, unknown, b"") == grpc.StatusCode.UNAUTHENTICATED
        assert raw_code(channel, unknown, b"", (("authorization", "Bearer s3cret"),)) == grpc.StatusCode.UNIMPLEMENTED
        health = health_pb2_grpc.HealthStub(channel)  # probes need no token
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(RewardServerError, match="UNAUTHENTICATED"):
            GrpcReward([address], token="wrong")
        assert GrpcReward([address], token="s3cret").score(images(1), ["a"]).scores.shape == (1,)


def test_the_token_is_checked_before_the_request_is_read():
    """An unauthenticated caller cannot make the server receive or parse a request body: bytes that are no
    ScoreRequest are refused as UNAUTHENTICATED (parsing them fails with INTERNAL, as it does for a caller
    with the token), and a 200 MiB request leaves the server's peak memory where it was (checked in the
    handler, receiving and parsing it raised the peak by ~600 MiB)."""
    with reward_server("jpeg", "--token-env", "RW_TOKEN", env={"RW_TOKEN": "s3cret"}) as (address, proc):
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 2**30)])
        score, token = "/tailorpo.reward.v1.RewardService/Score", (("authorization", "Bearer s3cret"),)
        assert raw_code(channel, score, b"\xff" * 64) == grpc.StatusCode.UNAUTHENTICATED
        assert raw_code(channel, score, b"\xff" * 64, token) == grpc.StatusCode.INTERNAL
        before = peak_memory_mib(proc.pid)
        assert raw_code(channel, score, b"\0" * 200 * 2**20) == grpc.StatusCode.UNAUTHENTICATED
        assert peak_memory_mib(proc.pid) - before < 50
        assert GrpcReward([address], token="s3cret").score(images(1), ["a"]).scores.shape == (1,)


@pytest.mark.slow
def test_mutual_tls(tmp_path):
    """With --tls-client-ca only clients presenting a certificate that CA signed get past the handshake."""
    cert, key = self_signed_cert(tmp_path, "server")
    client_cert, client_key = self_signed_cert(tmp_path, "client")  # self-signed: it is its own CA
    stranger_cert, stranger_key = self_signed_cert(tmp_path, "stranger")
    with reward_server("jpeg", "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", client_cert) as (address, _):
        client = GrpcReward([address], tls_ca=cert, tls_client_cert=client_cert, tls_client_key=client_key)
        assert client.score(images(1), ["a"]).scores.shape == (1,)
        for kwargs in ({}, {"tls_client_cert": stranger_cert, "tls_client_key": stranger_key}):
            with pytest.raises(RewardServerError, match="TLS handshake failed"):
                GrpcReward([address], tls_ca=cert, connect_timeout_s=2.0, **kwargs)
        with pytest.raises(RewardServerError, match="TLS handshake failed"):  # the server is not trusted
            GrpcReward([address], tls_ca=stranger_cert, tls_client_cert=client_cert, tls_client_key=client_key,
                       connect_timeout_s=2.0)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--tls-cert", "server.pem"], "--tls-cert and --tls-key: give both"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca (mutual TLS) needs the server's own --tls-cert"),
        (["--tls-cert", "nowhere.pem", "--tls-key", "nowhere.key"], "--tls-cert nowhere.pem: no such file"),
        (["--weights", "nowhere.pth"], "nowhere.pth"),
        (["--component", "clp=/m"], "--component: reward 'aesthetic' has no component 'clp'; its parts are: clip"),
        (["--component", "/models/clip"], "must each be PART=PATH"),
    ],
)
@pytest.mark.slow
def test_serve_reward_refuses_bad_flags_naming_them(flags, expected):
    proc = subprocess.run([sys.executable, "-m", "tailorpo.cli", "serve-reward", "aesthetic", "--port", "0", *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_serve_reward_refuses_an_unknown_reward_naming_the_choices():
    proc = subprocess.run([sys.executable, "-m", "tailorpo.cli", "serve-reward", "aesthetics", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown reward 'aesthetics'" in proc.stderr and "hpsv2" in proc.stderr


def start_concurrent_calls(service, request, count: int, timeout: float) -> tuple[list[threading.Thread], list]:
    """``count`` Score calls on their own threads; each appends its status code (OK or the error's)."""
    codes: list[grpc.StatusCode] = []

    def call() -> None:
        try:
            service.Score(request, timeout=timeout)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())

    threads = [threading.Thread(target=call) for _ in range(count)]
    for t in threads:
        t.start()
    return threads, codes


@pytest.mark.slow
def test_deadline_and_backpressure():
    with reward_server("jpeg", "--max-wait-ms", "1500", "--max-queue", "2", "--max-batch-size", "64") as (address, _):
        service = stub(address)
        request = reward_pb2.ScoreRequest(images=tensor_to_proto(images(1)), prompts=["a"])
        with pytest.raises(grpc.RpcError) as err:
            service.Score(request, timeout=0.3)  # waits 1.5 s to batch: misses its deadline
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        threads, codes = start_concurrent_calls(service, request, 5, timeout=10)
        for t in threads:
            t.join()
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 2, codes  # at most 2 admitted at once
        assert grpc.StatusCode.OK in codes


@pytest.mark.slow
def test_a_caller_that_gave_up_frees_its_queue_slot_at_once():
    with reward_server("jpeg", "--max-wait-ms", "1500", "--max-queue", "1", "--max-batch-size", "64") as (address, _):
        service = stub(address)
        request = reward_pb2.ScoreRequest(images=tensor_to_proto(images(1)), prompts=["a"])
        with pytest.raises(grpc.RpcError) as err:
            service.Score(request, timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.1)  # the server sees the same deadline a moment after the client does
        # the only slot is free again long before the batcher (1.5 s wait) would have reached the dead request
        assert len(service.Score(request, timeout=10).scores) == 1


@pytest.mark.slow
def test_full_queue_is_resource_exhausted_and_health_still_answers():
    """Each admitted call holds a handler thread; more calls than threads must be refused, not parked in
    grpc's own queue where health checks and Info would wait behind them."""
    with reward_server("jpeg", "--max-wait-ms", "4000", "--max-queue", "20", "--max-batch-size", "64") as (address, _):
        service = stub(address)
        request = reward_pb2.ScoreRequest(images=tensor_to_proto(images(1)), prompts=["a"])
        threads, codes = start_concurrent_calls(service, request, 30, timeout=20)  # more than the old 16 threads
        give_up = time.monotonic() + 2.5  # well before the 4 s batch releases the admitted calls
        while codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) < 10 and time.monotonic() < give_up:
            time.sleep(0.05)
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 10 and not codes.count(grpc.StatusCode.OK), codes
        # refused before it is read: bytes that are no request would otherwise fail parsing (INTERNAL)
        channel = grpc.insecure_channel(address)
        assert raw_code(channel, "/tailorpo.reward.v1.RewardService/Score", b"\xff" * 64) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING
        assert service.Info(reward_pb2.InfoRequest(), timeout=1).name == "jpeg"
        for t in threads:
            t.join()
        assert codes.count(grpc.StatusCode.OK) == 20, codes


@pytest.mark.slow
def test_a_second_server_on_the_same_port_fails_naming_the_address():
    with reward_server("jpeg") as (address, _):
        port = address.rsplit(":", 1)[1]
        proc = subprocess.run([sys.executable, "-m", "tailorpo.cli", "serve-reward", "jpeg", "--tiny", "--port", port],
                              capture_output=True, text=True, timeout=30)  # without the fix it serves forever
        assert proc.returncode == 2 and f"could not bind {address}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_graceful_shutdown_finishes_in_flight_work():
    with reward_server("jpeg", "--max-wait-ms", "1000") as (address, proc):
        result: dict = {}

        def call() -> None:
            request = reward_pb2.ScoreRequest(images=tensor_to_proto(images(1)), prompts=["a"])
            result["scores"] = list(stub(address).Score(request, timeout=10).scores)

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.3)  # the request is now waiting in the batcher
        proc.send_signal(signal.SIGTERM)
        thread.join()
        assert len(result["scores"]) == 1
        assert proc.wait(timeout=20) == 0


@pytest.mark.slow
def test_client_retries_a_killed_server_against_its_restart():
    with reward_server("jpeg", "--max-wait-ms", "2000") as (address, proc):
        port = address.rsplit(":", 1)[1]
        client = GrpcReward([address], retries=8, backoff_s=0.25)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(out=client.score(images(1), ["a"])))
        thread.start()
        time.sleep(0.5)
        proc.kill()  # mid-request: the call is waiting in the batcher
        proc.wait()
        with reward_server("jpeg", port=int(port)) as (_, restarted):
            thread.join(timeout=30)
            assert result["out"].scores.shape == (1,)


def test_unreachable_server_fails_fast_naming_the_address():
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="127.0.0.1:9"):
        GrpcReward(["127.0.0.1:9"], connect_timeout_s=1.0)
    assert time.monotonic() - start < 10


def test_weighted_sum_of_rewards(colorfulness_server, jpeg_server):
    x = images(2, seed=5)
    total = WeightedSum([(GrpcReward([colorfulness_server]), 0.5), (GrpcReward([jpeg_server]), 2.0)])
    expected = 0.5 * build_reward("colorfulness").score(x, ["a", "b"]).scores + 2.0 * build_reward(
        "jpeg").score(x, ["a", "b"]).scores
    torch.testing.assert_close(total.score(x, ["a", "b"]).scores, expected)
    assert not total.differentiable


@pytest.mark.slow
def test_a_rollout_logs_each_summed_reward(colorfulness_server, jpeg_server, policy):
    """With several reward servers the run log shows each one's mean and std on the final images, which
    combine to the summed reward the rollout was ranked by."""
    from tailorpo.config import load_config
    from tailorpo.training.build import rollout_generator
    from tailorpo.training.loop import collect_rollout

    total = WeightedSum([(GrpcReward([colorfulness_server]), 0.5), (GrpcReward([jpeg_server]), 2.0)])
    rollout = collect_rollout(load_config("launch/tiny.yaml"), policy, total, ["a cat", "a dog"],
                              rollout_generator(0, 0, 0))
    combined = 0.5 * rollout.stats["reward_colorfulness_mean"] + 2.0 * rollout.stats["reward_jpeg_mean"]
    assert combined == pytest.approx(float(rollout.rewards.mean()), rel=1e-5)
    assert rollout.stats["reward_jpeg_std"] > 0


def test_a_non_loopback_bind_without_tls_warns():
    with reward_server("jpeg", "--host", "0.0.0.0") as (_, proc):
        assert "reachable from other machines and TLS is off" in proc.stderr.readline()
    with reward_server("jpeg") as (_, proc):  # loopback: no warning
        proc.kill()
        assert "warning" not in proc.stderr.read()


@pytest.mark.slow
def test_tls(tmp_path):
    cert, key = self_signed_cert(tmp_path, "server")
    other_ca, _ = self_signed_cert(tmp_path, "other")
    with reward_server("jpeg", "--tls-cert", cert, "--tls-key", key) as (address, _):
        assert GrpcReward([address], tls_ca=cert).score(images(1), ["a"]).scores.shape == (1,)
        with pytest.raises(RewardServerError, match="unreachable"):
            GrpcReward([address], tls_ca=other_ca, connect_timeout_s=2.0)  # certificate not trusted
        with pytest.raises(RewardServerError):
            GrpcReward([address], connect_timeout_s=2.0)  # plaintext client


@pytest.mark.slow
def test_guided_rollout_is_the_same_with_the_remote_reward(colorfulness_server, policy):
    """TailorPO-G through the wire: the server's d score / d image chains into the decoder and the UNet
    exactly as the in-process reward's autograd does."""
    from tailorpo.algorithms.branching import tailorpo_rollout
    from tailorpo.core.guidance import cosine_eta_schedule

    prompts, steps = ["a cat", "a dog"], [20, 10]
    eta = cosine_eta_schedule(steps)
    runs = [
        tailorpo_rollout(policy, reward, prompts, torch.Generator().manual_seed(0), steps, guidance_eta=eta)
        for reward in (build_reward("colorfulness"), GrpcReward([colorfulness_server]))
    ]
    torch.testing.assert_close(runs[1].data.x_next_w, runs[0].data.x_next_w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runs[1].rewards, runs[0].rewards, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_train_against_a_reward_server_and_fail_fast_on_a_dead_one(colorfulness_server, tmp_path):
    from tailorpo.config import load_config
    from tailorpo.training.loop import train

    servers = f"reward.servers=[{{addresses: ['{colorfulness_server}']}}]"
    cfg = load_config("launch/tiny.yaml", [f"output_dir={tmp_path}", "train.total_samples=4",
                                           "algorithm.name=tailorpo_g", servers])
    summary = train(cfg, progress=False)
    assert summary.reward == "colorfulness" and summary.samples == 4 and summary.updates == 2
    proc = subprocess.run(
        [sys.executable, "-m", "tailorpo.cli", "train", "launch/tiny.yaml", "--set",
         "reward.servers=[{addresses: ['127.0.0.1:9']}]", "--set", f"output_dir={tmp_path / 'dead'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["aesthetic", "imagereward", "pickscore", "hpsv2"])
def test_learned_reward_servers_match_the_in_process_model(name):
    """Each learned reward behind the real server (tiny weights): Info, scores equal to calling the same
    model in process, and a gradient w.r.t. the full-size image through the client's resize."""
    local = build_reward(name, tiny=True)
    with reward_server(name) as (address, _):
        client = GrpcReward([address])
        assert (client.name, client.model_id, client.differentiable, client.image_size) == (
            name, local.model_id, True, 224)
        assert "tiny" in client.model_id
        x = images(2, size=64, seed=7)
        prompts = ["a photo of a cat", "a red car"]
        remote = client.score(x, prompts, want_grad=True)
        full = x.clone().requires_grad_(True)
        native = resize_and_center_crop(full, 224)
        expected = local.score(native.detach().clamp(0, 1), prompts, want_grad=True)
        torch.testing.assert_close(remote.scores, expected.scores, atol=1e-4, rtol=1e-4)
        (expected_grad,) = torch.autograd.grad(native, full, expected.grad)
        assert remote.grad.shape == x.shape and remote.grad.abs().sum() > 0
        torch.testing.assert_close(remote.grad, expected_grad, atol=1e-5, rtol=1e-3)


@pytest.mark.slow
def test_a_client_of_two_servers_survives_one_dead_server():
    with reward_server("jpeg") as (first, first_proc), reward_server("jpeg") as (second, _):
        client = GrpcReward([first, second], retries=3, backoff_s=0.05)
        x = images(1)
        for _ in range(4):
            client.score(x, ["a"])
        first_proc.kill()
        first_proc.wait()
        for _ in range(4):  # every other call lands on the dead address first and is retried on the live one
            assert client.score(x, ["a"]).scores.shape == (1,)


class _FakeReward(RewardModel):
    """A reward whose output the test dictates, to exercise the server's checks of the model."""

    name, differentiable = "fake", True

    def __init__(self, output) -> None:
        self.output = output

    def _score(self, images: torch.Tensor, prompts: list[str], want_grad: bool) -> RewardOutput:
        return self.output(images)


@contextmanager
def in_process_server(model: RewardModel, **config):
    running = start_server(model, ServerConfig(max_wait_ms=1, **config))
    try:
        yield running
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    "output, want_grad, expected",
    [
        (lambda x: RewardOutput(torch.zeros(len(x) - 1)), False, "scores of shape (1,) for 2 images"),
        (lambda x: RewardOutput(torch.zeros(len(x)), torch.zeros(len(x), 3, 4, 4)), True, "gradient of shape"),
        (lambda x: RewardOutput(torch.zeros(len(x))), True, "gradient of shape None"),
        (lambda x: RewardOutput(torch.tensor([0.0, float("nan")])), False, "non-finite scores"),
        (lambda x: RewardOutput(torch.zeros(len(x)), torch.full(x.shape, float("inf"))), True, "non-finite gradient"),
    ],
)
def test_model_output_of_the_wrong_shape_is_internal_naming_it(output, want_grad, expected):
    with in_process_server(_FakeReward(output)) as running:
        request = reward_pb2.ScoreRequest(images=tensor_to_proto(images(2)), prompts=["a", "b"], want_grad=want_grad)
        err = _bad(request, running.address)
        assert err.code() == grpc.StatusCode.INTERNAL and expected in err.details(), err.details()


def test_a_crashed_batcher_fails_callers_and_refuses_new_work():
    with in_process_server(build_reward("jpeg")) as running:
        def crash(batch):
            raise RuntimeError("boom")

        running.servicer.batcher._score = crash  # an exception escaping the worker loop itself
        request = reward_pb2.ScoreRequest(images=tensor_to_proto(images(1)), prompts=["a"])
        health_stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(running.address))
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health_stub.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        for expected in ("crashed: RuntimeError('boom')", "not running"):  # the waiting call, then a new one
            err = _bad(request, running.address)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and expected in err.details(), err.details()
        # load balancers and supervisors see it: health turns NOT_SERVING (serve-reward then exits with 1)
        assert health_stub.Check(health_pb2.HealthCheckRequest(service="")).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING


def test_score_during_shutdown_is_unavailable():
    with in_process_server(build_reward("jpeg")) as running:
        running.servicer.batcher.stop(timeout_s=5)
        err = _bad(reward_pb2.ScoreRequest(images=tensor_to_proto(images(1)), prompts=["a"]), running.address)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()


def test_an_oversized_request_is_not_retried_and_suggests_a_smaller_batch():
    with in_process_server(build_reward("jpeg"), max_message_mb=1) as running:
        client = GrpcReward([running.address], retries=3, backoff_s=1.0)
        start = time.monotonic()
        with pytest.raises(RewardServerError, match="smaller batch"):
            client.score(images(1, size=512), ["a"])  # 3 MiB of float32 against a 1 MiB limit
        assert time.monotonic() - start < 1.0  # no backoff sleeps


class _RaisingStub:
    def __init__(self, code: grpc.StatusCode) -> None:
        self.calls = 0
        self.code = code

    def Score(self, request, timeout, metadata):
        self.calls += 1
        error = grpc.RpcError()
        error.code, error.details = (lambda: self.code), (lambda: "down")
        raise error


def test_retries_sleep_only_between_attempts_with_jitter(jpeg_server, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(grpc_client, "time", SimpleNamespace(sleep=sleeps.append, monotonic=time.monotonic))
    client = GrpcReward([jpeg_server], retries=3, backoff_s=0.1)
    client._stubs = [_RaisingStub(grpc.StatusCode.UNAVAILABLE)]
    with pytest.raises(RewardServerError, match="gave up after 4 attempts"):
        client.score(images(1), ["a"])
    assert client._stubs[0].calls == 4 and len(sleeps) == 3, sleeps
    bases = [0.1, 0.2, 0.4]
    assert all(0.5 * b <= s <= 1.5 * b for s, b in zip(sleeps, bases, strict=True)) and sleeps != bases, sleeps


class _FixedStub:
    def __init__(self, response: reward_pb2.ScoreResponse) -> None:
        self.response = response

    def Score(self, request, timeout, metadata):
        return self.response


@pytest.mark.parametrize(
    "response, want_grad, expected",
    [
        (reward_pb2.ScoreResponse(scores=[1.0]), False, "returned 1 scores for 2 images"),
        (reward_pb2.ScoreResponse(scores=[1.0, 2.0], grad=tensor_to_proto(torch.zeros(2, 3, 4, 4))), True,
         "gradient of shape (2, 3, 4, 4) for images of shape (2, 3, 16, 16)"),
    ],
)
def test_client_rejects_a_response_of_the_wrong_shape(colorfulness_server, response, want_grad, expected):
    client = GrpcReward([colorfulness_server])
    client._stubs = [_FixedStub(response)]
    with pytest.raises(RewardServerError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        client.score(images(2), ["a", "b"], want_grad=want_grad)


def test_addresses_of_one_reward_must_agree(colorfulness_server, jpeg_server, monkeypatch):
    with pytest.raises(RewardServerError, match=f"{jpeg_server} serves name='jpeg'"):
        GrpcReward([colorfulness_server, jpeg_server])
    assert GrpcReward(["127.0.0.1:9", jpeg_server], connect_timeout_s=1.0).name == "jpeg"  # unreachable: skipped
    monkeypatch.setattr(reward_server_module, "PROTOCOL_VERSION", "tailorpo.reward.v2")
    with (
        in_process_server(build_reward("jpeg")) as running,
        pytest.raises(RewardServerError, match=f"{running.address} speaks protocol 'tailorpo.reward.v2'"),
    ):
        GrpcReward([jpeg_server, running.address])


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
@pytest.mark.parametrize("image_size", [8, 0])  # 8: resized on the client, chained by autograd; 0: sent as is
def test_remote_gradient_comes_back_on_the_inputs_device_and_dtype(colorfulness_server, device, image_size):
    """The wire gradient is float32 on the CPU; it must come back in the input's dtype and on its device
    (float64 here; on the CPU autograd would cast the dtype itself, the device only matters on a GPU)."""
    client = GrpcReward([colorfulness_server])
    client.image_size = image_size
    x = images(2, size=16, seed=6).double().to(device)
    out = client._score(x, ["a", "b"], want_grad=True)  # score() would cast to float32 before _score
    assert out.scores.device == x.device and out.grad.device == x.device and out.grad.dtype == torch.float64
    reference = client.score(x.float().cpu(), ["a", "b"], want_grad=True)
    torch.testing.assert_close(out.grad.float().cpu(), reference.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.scores.cpu(), reference.scores, rtol=1e-4, atol=1e-4)
