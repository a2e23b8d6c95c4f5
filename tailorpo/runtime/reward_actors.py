"""Reward servers a Ray job starts itself: one actor per server owns a ``tailorpo serve-reward`` process on
the node Ray places it on, so swapping or scaling a reward is a config change (``reward.launch``).

A server process that dies is started again on the same port, so the samplers' clients (which retry
UNAVAILABLE with backoff) get their batch in flight scored once it is back; if the owner actor itself dies,
Ray restarts it (``runtime.max_restarts``) and the new server takes a new port.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tailorpo.config import LaunchedRewardServer
from tailorpo.rewards.grpc_client import channel_credentials

WATCH_INTERVAL_S = 0.2


class RewardServerOwner:
    """Starts the server process, restarts it if it exits, reports its address, answers health, stops it."""

    def __init__(
        self, spec: dict, token_env: str | None = None, tls_ca: str | None = None, tls_client_cert: str | None = None,
        tls_client_key: str | None = None,
    ) -> None:
        self.spec = LaunchedRewardServer.model_validate(spec)
        self.token_env = token_env
        self.credentials = channel_credentials(tls_ca, tls_client_cert, tls_client_key)  # for the health probe
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"reward-{self.spec.name}-", suffix=".log")  # noqa: SIM115
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.port = self._start(port=0)
        host = self.spec.host
        if host in ("0.0.0.0", "::"):
            import ray

            host = ray.util.get_node_ip_address()
        self._address = f"{host}:{self.port}"
        threading.Thread(target=self._watch, daemon=True).start()

    def _command(self, port: int) -> list[str]:
        spec = self.spec
        command = [sys.executable, "-m", "tailorpo.cli", "serve-reward", spec.name, "--port", str(port),
                   "--host", spec.host, "--device", spec.device]
        command += ["--weights", spec.weights] if spec.weights else []
        command += ["--tiny"] if spec.tiny else []
        command += ["--dtype", spec.dtype] + [f"--component={part}={path}" for part, path in spec.components.items()]
        command += ["--token-env", self.token_env] if self.token_env else []
        command += ["--tls-cert", spec.tls_cert, "--tls-key", spec.tls_key] if spec.tls_cert else []
        command += ["--tls-client-ca", spec.tls_client_ca] if spec.tls_client_ca else []
        return command

    def _start(self, port: int) -> int:
        """Start the server and return its port once it listens (the token reaches it through the
        environment this actor inherited, never the command line)."""
        self.process = subprocess.Popen(self._command(port), stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.log.seek(0)
            raise RuntimeError(f"reward.launch {self.spec.name!r} did not start: {line!r} {self.log.read()[-2000:]}")
        return int(line.rsplit(":", 1)[1])

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            with self._lock:
                if self.process.poll() is None or self._stopping.is_set():
                    continue
                self.restarts += 1
                print(f"reward server {self.spec.name!r} exited ({self.process.returncode}); restarting on port "
                      f"{self.port}", file=sys.stderr)
                try:
                    self._start(self.port)
                except RuntimeError as err:  # e.g. the port was taken meanwhile: try again next tick
                    print(err, file=sys.stderr)

    def address(self) -> str:
        return self._address

    def pid(self) -> int:
        return self.process.pid

    def serving(self, timeout_s: float = 5.0) -> bool:
        if self.credentials is not None:
            channel = grpc.secure_channel(self._address, self.credentials)
        else:
            channel = grpc.insecure_channel(self._address)
        with channel:
            request = health_pb2.HealthCheckRequest(service="")
            status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s).status
        return status == health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> None:
        """SIGTERM: the server finishes in-flight work, then exits."""
        self._stopping.set()
        with self._lock:
            self.process.terminate()
            self.process.wait(timeout=60)
