"""The Ray runtime on a local Ray and on a simulated multi-node cluster."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tailorpo.config import ConfigError, load_config
from tailorpo.runtime.driver import train_on_ray
from tailorpo.training.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]
SHORT = ["train.total_samples=4", "eval.images_per_prompt=1"]


def lora(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "lora" / "pytorch_lora_weights.safetensors"))


def assert_same_lora(a, b) -> None:
    left, right = lora(a), lora(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def train_single_threaded(output_dir, *overrides: str) -> None:
    """The one-process trainer with one thread, as a 0.5-CPU Ray actor runs (float sums depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config("launch/tiny.yaml", [*SHORT, *overrides, f"output_dir={output_dir}"]), progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("algorithm, samples", [("tailorpo", 4), ("mapo", 8)])  # two updates each
def test_one_remote_sampler_reproduces_the_one_process_trainer(tmp_path, local_ray, algorithm, samples):
    """Samplers draw from the (seed, iteration, slot) noise stream and the learner applies rollouts in slot
    order, so with one sampler the LoRA equals the in-process run's bit for bit (both single-threaded: Ray
    gives a 0.5-CPU actor one thread, and float sums depend on the thread count). A pair objective on its
    own samples (MaPO) runs on the same runtime: its learner's noise is seeded by the rollout."""
    run = [f"algorithm.name={algorithm}", f"train.total_samples={samples}"]
    train_single_threaded(tmp_path / "local", *run)
    overrides = [*SHORT, *run, "runtime.samplers=1", f"output_dir={tmp_path / 'ray'}"]
    summary = train_on_ray(load_config("launch/tiny.yaml", overrides), progress=False)
    assert summary.samples == samples and summary.updates == 2
    assert_same_lora(tmp_path / "local", tmp_path / "ray")


def test_save_every_saves_the_lora_while_a_ray_run_goes(tmp_path, local_ray):
    """train.save_every on Ray: the learner saves output_dir/lora every N iterations, as the one-process loop
    does (it used to save only at the end). Watched during the run: the first LoRA file seen is an early one,
    not the final one, which finish writes."""
    out = tmp_path / "ray"
    path = out / "lora" / "pytorch_lora_weights.safetensors"
    first: dict[str, torch.Tensor] = {}
    finished = threading.Event()

    def watch() -> None:  # whole-file reads, not mmap: the learner may rewrite the file meanwhile
        while not first and not finished.is_set():
            try:
                first.update(safetensors_load(path.read_bytes()))
            except (OSError, SafetensorError):  # not written yet, or half written
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    overrides = [*SHORT, "train.total_samples=6", "runtime.samplers=1", "train.save_every=1", f"output_dir={out}"]
    try:
        summary = train_on_ray(load_config("launch/tiny.yaml", overrides), progress=False)
    finally:
        finished.set()
        watcher.join()
    assert summary.updates == 3 and first.keys() == lora(out).keys()
    assert any(not torch.equal(first[key], value) for key, value in lora(out).items())


def test_two_samplers_are_reproducible_and_train_on_both(tmp_path, local_ray):
    runs = []
    for name in ("a", "b"):
        cfg = load_config("launch/tiny.yaml", [*SHORT, "runtime.samplers=2", f"output_dir={tmp_path / name}"])
        runs.append(train_on_ray(cfg, progress=False))
    assert runs[0].updates == 2 and runs[0].samples == 4  # one iteration: a rollout from each sampler
    assert_same_lora(tmp_path / "a", tmp_path / "b")


def test_a_cluster_too_small_fails_fast_naming_the_fields(tmp_path, local_ray):
    cfg = load_config("launch/tiny.yaml", [*SHORT, "runtime.samplers=4", "runtime.sampler.num_cpus=1",
                                           f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"runtime: 4 samplers \+ 1 learner .* \(CPU: needs 4.5, cluster has 2\)"):
        train_on_ray(cfg, progress=False)


def test_samplers_on_another_node_reproduce_the_local_run(tmp_path):
    """A simulated two-node cluster: the head runs the driver and learner; the samplers need a custom
    resource only the second node has, so they can only run there. The LoRA equals a one-process run."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, resources={"sampler_node": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        overrides = [*SHORT, "runtime.samplers=1", "runtime.sampler.resources={sampler_node: 1}",
                     f"output_dir={tmp_path / 'cluster'}"]
        train_on_ray(load_config("launch/tiny.yaml", overrides), progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    train_single_threaded(tmp_path / "local")
    assert_same_lora(tmp_path / "local", tmp_path / "cluster")


def test_ray_job_submit_of_the_tiny_config(tmp_path):
    """The README's cluster flow: `ray start --head`, then `ray job submit --working-dir . -- tailorpo train`."""
    import os
    import socket
    import subprocess
    import sys

    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    ray_cli = os.path.join(bin_dir, "ray")
    head = [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", "--port=0", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            "--disable-usage-stats"]
    subprocess.run(head, check=True, env=env, capture_output=True, timeout=120)
    try:
        job = subprocess.run(
            [ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dashboard_port}", "--working-dir=.", "--",
             "tailorpo", "train", "launch/tiny.yaml", "--no-progress", "--set", "runtime.samplers=1",
             *[f"--set={o}" for o in SHORT], f"--set=output_dir={tmp_path / 'job'}"],
            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        assert (tmp_path / "job" / "lora" / "pytorch_lora_weights.safetensors").exists()
        assert (tmp_path / "job" / "summary.json").exists()
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_resume_on_ray_continues_the_run_exactly(tmp_path, local_ray):
    """Interrupted after 2 samples and resumed on Ray: the same LoRA as an uninterrupted one-process run."""
    ray_run = [*SHORT[1:], "runtime.samplers=1", "train.checkpoint_every=1", f"output_dir={tmp_path / 'ray'}"]
    train_on_ray(load_config("launch/tiny.yaml", [*ray_run, "train.total_samples=2"]), progress=False)
    train_on_ray(load_config("launch/tiny.yaml", [*ray_run, "train.total_samples=4"]), progress=False, resume=True)
    train_single_threaded(tmp_path / "local")
    assert_same_lora(tmp_path / "local", tmp_path / "ray")


def ledger_ids(out) -> list[str]:
    return [i for line in (out / "ledger.jsonl").read_text().splitlines() for i in json.loads(line)["samples"]]


def when_ledger_has(out, steps: list[tuple[int, Callable[[], None]]]) -> threading.Thread:
    """A thread that runs each action once the run's ledger has that many updates (the run is under way)."""

    def run() -> None:
        for lines, action in steps:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                ledger = out / "ledger.jsonl"
                if ledger.exists() and len(ledger.read_text().splitlines()) >= lines:
                    break
                time.sleep(0.05)
            action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.long
def test_killed_sampler_reward_server_and_learner_lose_and_repeat_nothing(tmp_path, local_ray):
    """One run, three faults: a sampler actor killed (Ray restarts it, its rollout is redrawn from the same
    noise stream), the launched reward server's process killed with SIGKILL (its owner restarts it on the same
    port; the samplers' calls in flight are retried), and the learner actor killed for good (the driver starts
    a new one from the newest checkpoint and replays the updates after it). The ledger lists every sample
    exactly once and the LoRA equals an undisturbed run's."""
    from tailorpo.runtime.driver import LEARNER_NAME, REWARD_NAME, SAMPLER_NAME

    faults: list[str] = []

    def kill_sampler() -> None:
        ray.kill(ray.get_actor(f"{SAMPLER_NAME}-0"), no_restart=False)
        faults.append("sampler")

    def kill_reward_server() -> None:
        owner = ray.get_actor(f"{REWARD_NAME}-0")
        pid = ray.get(owner.pid.remote())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while ray.get(owner.pid.remote()) == pid and time.monotonic() < deadline:
            time.sleep(0.1)
        faults.append("reward server" if ray.get(owner.pid.remote()) != pid else "reward server not restarted")

    def kill_learner() -> None:
        ray.kill(ray.get_actor(LEARNER_NAME), no_restart=True)
        faults.append("learner")

    run = ["train.total_samples=12", "eval.images_per_prompt=1", "runtime.samplers=1"]
    faulty = tmp_path / "faulty"
    killer = when_ledger_has(faulty, [(1, kill_sampler), (3, kill_reward_server), (4, kill_learner)])
    overrides = [*run, "train.checkpoint_every=2", "reward.launch=[{name: jpeg, resources: {num_cpus: 0}}]",
                 f"output_dir={faulty}"]
    summary = train_on_ray(load_config("launch/tiny.yaml", overrides), progress=False)
    killer.join()
    assert faults == ["sampler", "reward server", "learner"]
    assert summary.samples == 12 and summary.updates == 6 and summary.learner_restarts == 1
    assert sorted(ledger_ids(faulty)) == sorted(f"{it}:0:{row}" for it in range(6) for row in range(2))
    train_on_ray(load_config("launch/tiny.yaml", [*run, f"output_dir={tmp_path / 'clean'}"]), progress=False)
    assert_same_lora(tmp_path / "clean", faulty)  # in-process JPEG: the wire changes no score


@pytest.mark.long
def test_a_sampler_killed_again_and_again_loses_and_repeats_nothing(tmp_path, local_ray):
    """Stress for the restart race (a redraw sent while Ray restarts the actor fails at once): five kills of
    one sampler in a run of eight iterations, each as soon as the previous update is in."""
    from tailorpo.runtime.driver import SAMPLER_NAME

    kills: list[int] = []

    def kill(after: int) -> Callable[[], None]:
        return lambda: (ray.kill(ray.get_actor(f"{SAMPLER_NAME}-0"), no_restart=False), kills.append(after))

    run = ["train.total_samples=16", "eval.images_per_prompt=1", "runtime.samplers=1", "runtime.max_restarts=6"]
    faulty = tmp_path / "faulty"
    killer = when_ledger_has(faulty, [(n, kill(n)) for n in range(1, 6)])
    summary = train_on_ray(load_config("launch/tiny.yaml", [*run, f"output_dir={faulty}"]), progress=False)
    killer.join()
    assert kills == [1, 2, 3, 4, 5] and summary.samples == 16 and summary.learner_restarts == 0
    assert sorted(ledger_ids(faulty)) == sorted(f"{it}:0:{row}" for it in range(8) for row in range(2))
    train_single_threaded(tmp_path / "clean", *run)
    assert_same_lora(tmp_path / "clean", faulty)


@pytest.mark.long
def test_a_lost_node_moves_its_sampler_and_learner_and_loses_nothing(tmp_path):
    """A whole simulated node dies (its raylet killed, as a machine lost): the sampler and the learner it held
    are rebuilt on the spare node (Ray restarts the sampler; the driver starts a learner from the newest
    checkpoint), the rollout in flight is redrawn, the ledger lists each sample once and the LoRA equals an
    undisturbed run's."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver only
    doomed = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    run = ["train.total_samples=12", "eval.images_per_prompt=1", "runtime.samplers=1"]
    faulty = tmp_path / "faulty"
    result = {}

    def drive() -> None:
        try:
            result["summary"] = train_on_ray(cfg, progress=False)
        except Exception as err:  # noqa: BLE001 - re-raised by the assertion below, in the test's thread
            result["error"] = err

    try:
        cfg = load_config("launch/tiny.yaml", [*run, "train.checkpoint_every=1", f"output_dir={faulty}"])
        trainer = threading.Thread(target=drive)
        trainer.start()  # the driver loop in a thread: adding and removing nodes must happen in the main one
        when_ledger_has(faulty, [(2, lambda: None)]).join()
        cluster.add_node(num_cpus=1)  # the spare, added once the actors are placed on the doomed node
        cluster.remove_node(doomed, allow_graceful=False)
        trainer.join(timeout=600)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "summary" in result, result.get("error", "the run did not finish in 600 s")
    summary = result["summary"]
    assert summary.samples == 12 and summary.updates == 6
    assert summary.learner_restarts == 1 and summary.sampler_redraws >= 1  # both were on the lost node
    assert sorted(ledger_ids(faulty)) == sorted(f"{it}:0:{row}" for it in range(6) for row in range(2))
    train_single_threaded(tmp_path / "clean", *run)
    assert_same_lora(tmp_path / "clean", faulty)


def test_pipelined_samplers_draw_one_version_stale(tmp_path, local_ray):
    """runtime.pipeline: each batch after the first is drawn with the LoRA the learner is updating (lag 1),
    so the result differs from the on-policy run but is still reproducible; the idle fraction is logged."""
    run = ["train.total_samples=6", "eval.images_per_prompt=1", "runtime.samplers=1"]
    lags = {}
    for name, pipeline in (("a", True), ("b", True), ("on_policy", False)):
        cfg = load_config("launch/tiny.yaml", [*run, f"runtime.pipeline={pipeline}", f"output_dir={tmp_path / name}"])
        summary = train_on_ray(cfg, progress=False)
        events = EventAccumulator(str(tmp_path / name / "tensorboard")).Reload()
        lags[name] = [e.value for e in events.Scalars("train/policy_lag")]
        assert len(events.Scalars("perf/sampler_idle_fraction")) == 3
        assert summary.sampler_idle_fraction is not None and 0 <= summary.sampler_idle_fraction < 1
    assert lags == {"a": [0, 1, 1], "b": [0, 1, 1], "on_policy": [0, 0, 0]}
    assert_same_lora(tmp_path / "a", tmp_path / "b")
    with pytest.raises(AssertionError):
        assert_same_lora(tmp_path / "a", tmp_path / "on_policy")


def test_reward_servers_launched_by_the_job(tmp_path, local_ray):
    """reward.launch: the job starts the server as an actor-owned process, waits for its health, and the
    samplers' guidance gradients come over gRPC from it."""
    overrides = [*SHORT, "runtime.samplers=1", "algorithm.name=tailorpo_g", f"output_dir={tmp_path}",
                 "reward.launch=[{name: colorfulness, resources: {num_cpus: 0.5}}]"]
    summary = train_on_ray(load_config("launch/tiny.yaml", overrides), progress=False)
    assert summary.reward == "colorfulness" and summary.updates == 2
    saved = load_config(tmp_path / "config.yaml")
    assert saved.reward.launch[0].name == "colorfulness"  # the config as the user wrote it
