"""What it costs to run a reward behind the gRPC reward server instead of in process. All figures use the
tiny models (``--tiny``) on CPU, and everything runs in one go. The machine is noisy, so the figures to read
are the ratios inside one run, not the absolute times.

1. Latency per call, gRPC vs in process. Each call scores a batch of 4 images at 512x512. The gRPC path is
   ``GrpcReward.score``: it resizes on the client to the server's native size (224 for aesthetic), encodes,
   sends and decodes, and for want_grad it chains the returned gradient back through the resize. The in
   process path does the same resize (and backward through it) around ``model.score``. Samplers and guidance
   call the reward once per step, so this overhead is paid every step. The gRPC/in-process ratio says
   whether serving a reward separately is nearly free or a bottleneck. With the tiny models the model
   itself costs almost nothing, so the ratio is an upper bound: at SD scale the same absolute overhead
   is a small fraction of a real CLIP ViT-L forward. ``jpeg`` has no native size. It is sent at full 512 px,
   which shows what the transport costs when nothing shrinks the images. The latency servers use
   ``--max-wait-ms 0``. A lone caller never fills a batch, so any batching window is added to each of its
   calls in full. One extra row measures this on the part-3 batching server (10 ms window).
2. Bytes on the wire per image. The serialized ScoreRequest is divided by N, at native size (224) and at
   full size (512), for each wire dtype. The ratio shows how much the client-side resize saves, and how
   much float16/bfloat16 saves on top. This matters because image bytes dominate the request, and the
   bandwidth needed scales with it once servers sit on other hosts.
3. Throughput with and without dynamic batching. 4 client threads each send 2-image requests (224 px) to
   a tiny aesthetic server. One server has ``--max-batch-size 16 --max-wait-ms 10`` and the other has
   ``--max-batch-size 2 --max-wait-ms 0`` (no batching). The table gives images/s and the mean
   ``batch_size`` reported in the responses. Batching is the server's answer to many small concurrent
   callers (several samplers, or guidance at every step). The ratio shows whether it pays for its wait
   window.

The benchmark process runs torch with 1 thread. The servers get their default settings (torch's own thread
count) and share the same 2 cores with the client, so their compute and the client's compete for CPU.

Usage: TAILORPO_CACHE=/tmp/tc python benchmarks/reward_server.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch

from common import PROMPT, Figure, RewardServerProcess, add_figures_argument, write_figures
from tailorpo._proto import reward_pb2
from tailorpo.rewards import build_reward
from tailorpo.rewards.grpc_client import GrpcReward
from tailorpo.rewards.images import resize_and_center_crop
from tailorpo.rewards.wire import tensor_to_proto

N_LATENCY = 4  # images per call in part 1
FULL = 512
THREADS, PER_REQUEST = 4, 2  # part 3: client threads, images per request


@dataclass(frozen=True)
class Rounds:
    latency: int  # paired gRPC / in-process calls per row
    calls: int  # part 3: calls per thread per run
    throughput: int  # alternating batched / unbatched runs


ROUNDS, QUICK_ROUNDS = Rounds(latency=40, calls=25, throughput=5), Rounds(latency=12, calls=10, throughput=3)


# ---------------------------------------------------------------- part 1: latency


def local_score(model, images: torch.Tensor, prompts: list[str], want_grad: bool):
    """Exactly what GrpcReward._score does around the wire: resize to the native size (differentiably),
    score, and chain the gradient back through the resize."""
    size = getattr(model, "image_size", 0)
    full = images.clone().requires_grad_(want_grad)
    with torch.enable_grad():
        native = resize_and_center_crop(full, size) if size else full
    out = model.score(native.detach().clamp(0, 1), prompts, want_grad=want_grad)
    if not want_grad or native is full:
        return out.scores, out.grad
    (grad,) = torch.autograd.grad(native, full, out.grad)
    return out.scores, grad


def paired_latency(client: GrpcReward, model, images: torch.Tensor, prompts: list[str], want_grad: bool,
                   rounds: int):
    """Median seconds per call for each path. The calls alternate (and so does which goes first) so that
    load spikes on the shared machine hit both paths alike. Also checks that the two paths agree."""
    for _ in range(3):  # warm-up: channel, allocator, lazy inits
        remote = client.score(images, prompts, want_grad)
        local = local_score(model, images, prompts, want_grad)
    torch.testing.assert_close(remote.scores, local[0], rtol=1e-4, atol=1e-4)
    if want_grad:
        torch.testing.assert_close(remote.grad, local[1], rtol=1e-3, atol=1e-6)
    grpc_t, local_t = [], []
    for i in range(rounds):
        order = ((client.score, grpc_t), (lambda *a: local_score(model, *a), local_t))
        for fn, sink in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn(images, prompts, want_grad)
            sink.append(time.perf_counter() - start)
    return statistics.median(grpc_t), statistics.median(local_t)


# ---------------------------------------------------------------- part 2: bytes


def request_bytes_per_image(images: torch.Tensor, prompts: list[str], dtype: str) -> float:
    request = reward_pb2.ScoreRequest(images=tensor_to_proto(images.clamp(0, 1), dtype), prompts=prompts)
    return len(request.SerializeToString()) / images.shape[0]


# ---------------------------------------------------------------- part 3: throughput


def throughput_run(stub, requests: list[reward_pb2.ScoreRequest], calls: int) -> tuple[float, list[int]]:
    """THREADS threads, each sending its request ``calls`` times. Returns (images/s, batch_size of each
    response)."""
    sizes: list[list[int]] = [[] for _ in requests]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(requests) + 1)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(calls):
                sizes[k].append(stub.Score(requests[k], timeout=60).batch_size)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    images = sum(len(r.prompts) for r in requests) * calls
    return images / elapsed, [s for per in sizes for s in per]


# ---------------------------------------------------------------- main


def headline(latency: dict[str, tuple[float, float]], wire_bytes: dict[str, tuple[float, float]],
             images_per_s: dict[str, float], mean_batch: dict[str, float]) -> list[Figure]:
    """Each part's ratio: what gRPC adds per call, what the resize and the wire dtype save, what batching buys."""
    readings = {
        "aesthetic": "> 1, an upper bound: the tiny model itself costs ~nothing",
        "aesthetic, want_grad": "nearer 1: the backward weighs on both paths alike",
        "jpeg, 512 px": "the transport's cost when nothing shrinks the images",
    }
    remote, local = latency["aesthetic"]
    small32, big32 = wire_bytes["float32"]
    return [
        *(Figure(f"gRPC/in-process latency, {key}", latency[key][0] / latency[key][1], reading)
          for key, reading in readings.items()),
        Figure("gRPC overhead per call, aesthetic (ms)", (remote - local) * 1e3,
               "what a reward step pays at any model size; small next to an SD-scale reward", digits=1),
        Figure("bytes per image, 512 px / 224 px", big32 / small32, "(512/224)^2 = 5.22: the client-side resize"),
        Figure("bytes per image, 512 px float32 / 224 px bfloat16", big32 / wire_bytes["bfloat16"][0],
               "5.22 x 2 = 10.4: resize and a half-precision wire"),
        Figure("throughput, batching/none", images_per_s["batched"] / images_per_s["unbatched"],
               "> 1 only where a model call outlasts the 10 ms window (SD-scale); < 1 on tiny models"),
        Figure("mean batch_size, batching/none", mean_batch["batched"] / mean_batch["unbatched"],
               f"up to {THREADS}: the {THREADS} clients' requests merge into one model call"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} instead of {ROUNDS}")
    add_figures_argument(parser)
    args = parser.parse_args()
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(N_LATENCY, 3, FULL, FULL, generator=gen)
    prompts = [PROMPT] * N_LATENCY

    servers = {
        "aesthetic": RewardServerProcess("aesthetic", "--max-wait-ms", "0"),
        "jpeg": RewardServerProcess("jpeg", "--max-wait-ms", "0"),
        "batched": RewardServerProcess("aesthetic", "--max-batch-size", "16", "--max-wait-ms", "10"),
        "unbatched": RewardServerProcess("aesthetic", "--max-batch-size", "2", "--max-wait-ms", "0"),
    }
    clients: list[GrpcReward] = []
    try:
        addresses = {key: s.wait_ready() for key, s in servers.items()}  # all four start in parallel
        startup = time.perf_counter() - t0

        def client(key: str) -> GrpcReward:
            clients.append(GrpcReward([addresses[key]]))
            return clients[-1]

        print(f"reward server benchmark (tiny models, CPU, {os.cpu_count()} cores; benchmark process: "
              f"torch threads = {torch.get_num_threads()}; 4 servers up in {startup:.1f}s)\n")

        # 1. latency
        aesthetic = build_reward("aesthetic", tiny=True)
        jpeg = build_reward("jpeg")
        rows = [  # (figure key, reward, grad, client, model, want_grad, server)
            ("aesthetic", "aesthetic", "no", client("aesthetic"), aesthetic, False, "--max-wait-ms 0"),
            ("aesthetic, want_grad", "aesthetic", "yes", clients[-1], aesthetic, True, "--max-wait-ms 0"),
            ("jpeg, 512 px", "jpeg", "no", client("jpeg"), jpeg, False, "--max-wait-ms 0"),
            ("aesthetic, 10 ms window", "aesthetic", "no", client("batched"), aesthetic, False,
             "--max-wait-ms 10 (part 3)"),
        ]
        print(f"1. Latency per call, median of {rounds.latency} alternating calls; batch of {N_LATENCY} "
              f"images {FULL}x{FULL} (client resizes to the server's native size)")
        header = (f"   {'reward':<10} {'grad':<5} {'sent as':<8} {'gRPC ms':>8} {'in-proc ms':>11} "
                  f"{'gRPC/in-proc':>13} {'overhead ms':>12}  server")
        print(header)
        print("   " + "-" * (len(header) - 3 + 20))
        latency: dict[str, tuple[float, float]] = {}
        for key, name, grad_label, cl, model, want_grad, server_label in rows:
            remote, local = latency[key] = paired_latency(cl, model, images, prompts, want_grad, rounds.latency)
            sent = f"{cl.image_size or FULL}px"
            print(f"   {name:<10} {grad_label:<5} {sent:<8} {remote * 1e3:8.1f} {local * 1e3:11.1f} "
                  f"{remote / local:12.2f}x {(remote - local) * 1e3:12.1f}  {server_label}")

        # 2. bytes on the wire
        native = resize_and_center_crop(images, 224)
        print(f"\n2. Bytes on the wire per image: len(ScoreRequest.SerializeToString()) / N, N={N_LATENCY} "
              f"(raw float32 pixels: {3 * 224 * 224 * 4:,} / {3 * FULL * FULL * 4:,}; "
              "the rest is shape, dtype, prompt)")
        print(f"   {'dtype':<9} {'224px (native)':>15} {'512px (full)':>14} {'512/224':>8} "
              f"{'224 vs fp32':>12} {'512 vs fp32':>12}")
        print("   " + "-" * 75)
        sizes_b = {d: (request_bytes_per_image(native, prompts, d), request_bytes_per_image(images, prompts, d))
                   for d in ("float32", "float16", "bfloat16")}
        small32, big32 = sizes_b["float32"]
        for dtype, (small, big) in sizes_b.items():
            print(f"   {dtype:<9} {small:15,.0f} {big:14,.0f} {big / small:7.2f}x "
                  f"{small / small32:11.2f}x {big / big32:11.2f}x")
        print(f"   full-size float32 / native bfloat16: {big32 / sizes_b['bfloat16'][0]:.1f}x")

        # 3. throughput with and without dynamic batching
        requests = [
            reward_pb2.ScoreRequest(
                images=tensor_to_proto(torch.rand(PER_REQUEST, 3, 224, 224, generator=gen)),
                prompts=[PROMPT] * PER_REQUEST,
            )
            for _ in range(THREADS)
        ]
        stubs = {"batched": client("batched")._stubs[0], "unbatched": client("unbatched")._stubs[0]}
        for stub in stubs.values():
            throughput_run(stub, requests, 2)  # warm-up
        rates: dict[str, list[float]] = {k: [] for k in stubs}
        sizes: dict[str, list[int]] = {k: [] for k in stubs}
        for i in range(rounds.throughput):
            for key in (("batched", "unbatched") if i % 2 == 0 else ("unbatched", "batched")):
                rate, batch_sizes = throughput_run(stubs[key], requests, rounds.calls)
                rates[key].append(rate)
                sizes[key].extend(batch_sizes)
        print(f"\n3. Throughput, tiny aesthetic: {THREADS} client threads x {rounds.calls} calls x {PER_REQUEST} "
              f"images (224px), median of {rounds.throughput} alternating runs")
        print(f"   {'server':<50} {'images/s':>9} {'mean batch_size':>16} {'max':>4}")
        print("   " + "-" * 82)
        labels = {"batched": "batching (--max-batch-size 16 --max-wait-ms 10)",
                  "unbatched": "no batching (--max-batch-size 2 --max-wait-ms 0)"}
        med = {k: statistics.median(v) for k, v in rates.items()}
        mean_bs = {k: statistics.fmean(v) for k, v in sizes.items()}
        for key in ("batched", "unbatched"):
            print(f"   {labels[key]:<50} {med[key]:9.1f} {mean_bs[key]:16.2f} {max(sizes[key]):4d}")
        print(f"   ratio with/without batching: throughput {med['batched'] / med['unbatched']:.2f}x, "
              f"mean batch_size {mean_bs['batched'] / mean_bs['unbatched']:.2f}x")
        print(f"   (runs, images/s: batching {', '.join(f'{r:.0f}' for r in rates['batched'])}; "
              f"no batching {', '.join(f'{r:.0f}' for r in rates['unbatched'])})")
        print(f"\ntotal {time.perf_counter() - t0:.1f}s")
        write_figures(args.figures, headline(latency, sizes_b, med, mean_bs))
        return 0
    finally:
        for cl in clients:
            cl.close()
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
