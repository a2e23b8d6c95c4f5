"""A reward server under sustained load and then overload: does it lose, mix up or slow down answers, grow its
memory, or queue without bound?

1. Sustained: CLIENTS (16) threads call Score back to back for ``--duration`` seconds (default 60; ``--quick``
   10). Each request holds 2 of a pool of distinct 224x224 images, and every response is checked against the
   in-process reward of exactly those images: a lost call (any error) or a response with another request's
   scores (mismatched) is counted. The server admits ``--max-queue`` (32) requests, more than the 16
   clients can have in flight, so nothing should be refused here.
2. Overload: OVERLOAD_FACTOR x max-queue (128) threads for a third of the duration. The server must push back
   (RESOURCE_EXHAUSTED, from its own queue bound or from grpc's concurrent-RPC limit just above it) rather
   than queue: an admitted call waits behind at most max-queue others, which the report compares with the
   measured latency. Refused calls are retried after a jittered backoff as ``GrpcReward`` does, so a request
   is lost only if it fails some other way.
3. Server memory (RSS, sampled every 0.5 s in each phase): start, end and max. Flat under sustained load;
   under overload it rises to a plateau, since at most max-queue + 8 calls hold a request at once.

The reward is ``jpeg`` by default: its scores (minus the JPEG size in kB) are exact and differ between the
pool's images by at least the printed gap, so any swapped response is caught. ``--reward aesthetic`` serves
the tiny aesthetic model instead (a real model call per batch), but its random-weight scores differ between
images by less than float noise, so there the check catches lost and misshapen answers, not swaps.
The benchmark process runs torch with 1 thread; the server and the clients share the machine's cores.

Usage: TAILORPO_CACHE=/tmp/tc python benchmarks/reward_load.py [--quick] [--duration S] [--reward aesthetic]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import PROMPT, Figure, RewardServerProcess, add_figures_argument, write_figures
from tailorpo._proto import reward_pb2
from tailorpo.rewards import build_reward
from tailorpo.rewards.wire import tensor_to_proto

SCORE = "/tailorpo.reward.v1.RewardService/Score"
CLIENTS = 16
QUICK_S = 10.0  # --quick: seconds of sustained load
MAX_QUEUE = 32
OVERLOAD_FACTOR = 4  # overload clients per admitted request
POOL, PER_REQUEST, SIZE = 32, 2, 224  # distinct requests, images per request, image side
RSS_EVERY_S = 0.5
WARM_UP_S = 3.0  # the server's RSS settles within a few seconds of load
BACKOFF_S = (0.05, 0.2)  # jittered retry delay after RESOURCE_EXHAUSTED


@dataclass
class Phase:
    """What one phase's clients saw; each client fills its own, merged at the end (no locks on the hot path)."""

    name: str
    clients: int
    seconds: float = 0.0
    ok: int = 0
    lost: int = 0
    mismatched: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # RESOURCE_EXHAUSTED details: count
    errors: Counter[str] = field(default_factory=Counter)  # other status codes of lost calls
    latencies: list[float] = field(default_factory=list)  # seconds per admitted call
    rss_mib: list[float] = field(default_factory=list)  # the server's RSS, every RSS_EVERY_S from the start

    def merge(self, other: Phase) -> None:
        self.ok += other.ok
        self.lost += other.lost
        self.mismatched += other.mismatched
        self.refused += other.refused
        self.errors += other.errors
        self.latencies += other.latencies

    def percentile_ms(self, q: float) -> float:
        return statistics.quantiles(self.latencies, n=100)[q - 1] * 1e3 if len(self.latencies) > 1 else float("nan")


@dataclass
class LoadResult:
    sustained: Phase
    overload: Phase
    min_gap: float  # smallest difference between the expected scores of two different pool images
    healthy_after: bool  # health SERVING and a last request scored right after both phases


def make_pool(model) -> list[tuple[bytes, torch.Tensor]]:
    """POOL distinct requests, serialized once (so the clients spend little CPU per call), and the in-process
    scores of their images. Each image is a flat colour plus noise of its own amplitude, so its JPEG size (the
    jpeg score) differs from every other image's."""
    gen = torch.Generator().manual_seed(0)
    n = POOL * PER_REQUEST
    amplitude = torch.linspace(0.02, 0.5, n)[torch.randperm(n, generator=gen)]
    flat = torch.rand(n, 3, 1, 1, generator=gen) * 0.5 + 0.25
    noise = torch.rand(n, 3, SIZE, SIZE, generator=gen) - 0.5
    images = (flat + amplitude[:, None, None, None] * noise).clamp(0, 1)
    pool = []
    for k in range(POOL):
        x = images[k * PER_REQUEST : (k + 1) * PER_REQUEST]
        prompts = [PROMPT] * PER_REQUEST
        request = reward_pb2.ScoreRequest(images=tensor_to_proto(x), prompts=prompts)
        pool.append((request.SerializeToString(), model.score(x, prompts).scores))
    return pool


def client_loop(score: grpc.UnaryUnaryMultiCallable, pool, stop_at: float, phase: Phase, seed: int) -> None:
    """Score random pool requests until ``stop_at``; a refused request is retried until admitted."""
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        request, expected = pool[rng.randrange(len(pool))]
        while True:
            start = time.perf_counter()
            try:
                response = reward_pb2.ScoreResponse.FromString(score(request, timeout=60))
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    phase.refused[(err.details() or "").split(";")[0]] += 1
                    time.sleep(rng.uniform(*BACKOFF_S))
                    continue
                phase.lost += 1
                phase.errors[err.code().name] += 1
                break
            phase.latencies.append(time.perf_counter() - start)
            scores = torch.tensor(list(response.scores))
            if scores.shape == expected.shape and torch.allclose(scores, expected, rtol=0, atol=1e-5):
                phase.ok += 1
            else:
                phase.mismatched += 1
            break


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def run_phase(
    score: grpc.UnaryUnaryMultiCallable, pool, name: str, clients: int, seconds: float, server_pid: int
) -> Phase:
    """``clients`` threads for ``seconds``, sampling the server's RSS meanwhile."""
    phases = [Phase(name, clients) for _ in range(clients)]
    stop_at = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(score, pool, stop_at, p, k)) for k, p in enumerate(phases)]
    total = Phase(name, clients, rss_mib=[rss_mib(server_pid)])
    start = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        threads[0].join(RSS_EVERY_S)
        total.rss_mib.append(rss_mib(server_pid))
    for t in threads:
        t.join()
    total.seconds = time.perf_counter() - start
    for p in phases:
        total.merge(p)
    return total


def run_load(seconds: float, reward: str = "jpeg") -> LoadResult:
    """Both phases against one fresh server; the overload phase lasts a third of ``seconds``."""
    model = build_reward(reward, tiny=True)
    pool = make_pool(model)
    expected = torch.cat([e for _, e in pool]).sort().values
    server = RewardServerProcess(reward, "--max-queue", str(MAX_QUEUE))
    try:
        channel = grpc.insecure_channel(server.wait_ready(), options=[("grpc.max_receive_message_length", 2**28)])
        score = channel.unary_unary(SCORE)  # bytes in, bytes out: the pool is serialized already
        pid = server.proc.pid
        run_phase(score, pool, "warm-up", CLIENTS, WARM_UP_S, pid)
        sustained = run_phase(score, pool, "sustained", CLIENTS, seconds, pid)
        overload = run_phase(score, pool, "overload", OVERLOAD_FACTOR * MAX_QUEUE, seconds / 3, pid)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        request, scores = pool[0]
        last = torch.tensor(list(reward_pb2.ScoreResponse.FromString(score(request, timeout=10)).scores))
        healthy = health == health_pb2.HealthCheckResponse.SERVING and torch.allclose(last, scores, rtol=0, atol=1e-5)
        channel.close()
    finally:
        server.stop()
    return LoadResult(sustained, overload, float((expected[1:] - expected[:-1]).min()), healthy)


def report(result: LoadResult, reward: str) -> None:
    print(f"reward load benchmark: {reward} server (--tiny --max-queue {MAX_QUEUE}, default batching: "
          f"--max-batch-size 16 --max-wait-ms 5), {POOL} distinct requests of {PER_REQUEST} images "
          f"{SIZE}x{SIZE} float32; smallest gap between two images' expected scores {result.min_gap:.4g} "
          "(a response is mismatched if any score is off by more than 1e-5)\n")
    print(f"   {'phase':<10} {'clients':>7} {'s':>5} {'requests':>8} {'req/s':>7} {'images/s':>8} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'lost':>5} {'mismatched':>10} {'refused':>8}")
    for p in (result.sustained, result.overload):
        print(f"   {p.name:<10} {p.clients:7d} {p.seconds:5.1f} {p.ok:8d} {p.ok / p.seconds:7.1f} "
              f"{p.ok * PER_REQUEST / p.seconds:8.1f} {p.percentile_ms(50):7.1f} {p.percentile_ms(99):7.1f} "
              f"{p.lost:5d} {p.mismatched:10d} {sum(p.refused.values()):8d}")
    for p in (result.sustained, result.overload):
        for reason, count in p.refused.most_common():
            print(f"   {p.name} RESOURCE_EXHAUSTED x{count}: {reason}")
        for code, count in p.errors.most_common():
            print(f"   {p.name} lost x{count}: {code}")
    print(f"\n   server RSS MiB, sampled every {RSS_EVERY_S} s:")
    for p in (result.sustained, result.overload):
        print(f"   {p.name:<10} start {p.rss_mib[0]:5.0f}  end {p.rss_mib[-1]:5.0f}  max {max(p.rss_mib):5.0f}")
    over = result.overload
    print(f"\n   overload: an admitted call waits behind at most max_queue = {MAX_QUEUE} others, at "
          f"{over.ok / over.seconds:.1f} req/s about {MAX_QUEUE / (over.ok / over.seconds) * 1e3:.0f} ms "
          f"(measured p50 {over.percentile_ms(50):.0f} ms); {over.clients} callers queued unbounded would wait "
          f"~{over.clients / (over.ok / over.seconds) * 1e3:.0f} ms")
    after = "SERVING, and a last request scored right" if result.healthy_after else "UNHEALTHY"
    print(f"   after both phases: {after}")


def headline(result: LoadResult) -> list[Figure]:
    """For run_all.py: throughput and latency under load, answers lost or mixed up, and the backpressure."""
    sustained, overload = result.sustained, result.overload
    bound_ms = MAX_QUEUE / (overload.ok / overload.seconds) * 1e3  # waiting behind max_queue admitted calls
    return [
        Figure("sustained images/s", sustained.ok * PER_REQUEST / sustained.seconds,
               f"absolute: {CLIENTS} clients, the machine's cores shared with the server", digits=1),
        Figure("sustained p50 latency (ms)", sustained.percentile_ms(50), "absolute", digits=1),
        Figure("sustained p99 latency (ms)", sustained.percentile_ms(99), "absolute; p99 far above p50 means stalls",
               digits=1),
        Figure("lost + mismatched responses", sustained.lost + sustained.mismatched + overload.lost
               + overload.mismatched, "0: every call answered, with its own images' scores", digits=0),
        Figure("overload: refused calls", sum(overload.refused.values()),
               "> 0: the server pushes back (RESOURCE_EXHAUSTED) instead of queueing", digits=0),
        Figure("overload p50 / (max_queue / req/s)", overload.percentile_ms(50) / bound_ms,
               f"<= ~1: the queue is bounded; ~{OVERLOAD_FACTOR} if every caller queued"),
        Figure("server RSS growth, sustained (MiB)", max(sustained.rss_mib) - sustained.rss_mib[0], "~0: flat",
               digits=0),
        Figure("server RSS rise, overload (MiB)", max(overload.rss_mib) - overload.rss_mib[0],
               "a plateau: at most max_queue + 8 calls hold a request", digits=0),
        Figure("healthy after both phases", float(result.healthy_after), "1: SERVING, a last request scored right",
               digits=0),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of sustained load (overload: 1/3)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_S:.0f} s of sustained load (CI)")
    parser.add_argument("--reward", choices=["jpeg", "aesthetic"], default="jpeg")
    add_figures_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seconds = QUICK_S if args.quick else args.duration
    start = time.perf_counter()
    result = run_load(seconds, args.reward)
    report(result, args.reward)
    print(f"\ntotal {time.perf_counter() - start:.1f}s")
    write_figures(args.figures, headline(result))
    failed = result.sustained.lost + result.sustained.mismatched + result.overload.lost + result.overload.mismatched
    return 1 if failed or not result.healthy_after else 0


if __name__ == "__main__":
    sys.exit(main())
