"""Reward servers a Ray job starts itself: one actor per server owns a ``tailorpo serve-reward`` process on
the node Ray places it on, so swapping or scaling a reward is a config change (``reward.launch``)."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tailorpo.config import LaunchedRewardServer


class RewardServerOwner:
    """Starts the server process, reports its address, answers health, stops it. Ray restarts the actor
    (and so the server) if it dies."""

    def __init__(self, spec: dict) -> None:
        self.spec = LaunchedRewardServer.model_validate(spec)
        command = [sys.executable, "-m", "tailorpo.cli", "serve-reward", self.spec.name, "--port", "0",
                   "--host", self.spec.host, "--device", self.spec.device]
        command += ["--weights", self.spec.weights] if self.spec.weights else []
        command += ["--tiny"] if self.spec.tiny else []
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"reward-{self.spec.name}-", suffix=".log")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.log.seek(0)
            raise RuntimeError(f"reward.launch {self.spec.name!r} did not start: {line!r} {self.log.read()[-2000:]}")
        port = line.rsplit(":", 1)[1].strip()
        host = self.spec.host
        if host in ("0.0.0.0", "::"):
            import ray

            host = ray.util.get_node_ip_address()
        self._address = f"{host}:{port}"

    def address(self) -> str:
        return self._address

    def serving(self, timeout_s: float = 5.0) -> bool:
        with grpc.insecure_channel(self._address) as channel:
            request = health_pb2.HealthCheckRequest(service="")
            status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s).status
        return status == health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> None:
        """SIGTERM: the server finishes in-flight work, then exits."""
        self.process.terminate()
        self.process.wait(timeout=60)
