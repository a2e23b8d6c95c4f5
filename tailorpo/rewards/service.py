"""What a reward server and its clients must agree on, in one place for the server core, the gRPC client, the
config and ``tailorpo serve-reward``: the server's settings and their defaults, the client's retry and message
limits, the TLS pairing rules and the bearer token read from the environment.

Torch-free and grpc-free, so the config validates all of it before any model or channel exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MAX_MESSAGE_MB = 256  # gRPC message limit both ways: a batch of 64 512x512 float32 images is 192 MiB
TIMEOUT_S = 60.0  # deadline of one Score call
RETRIES = 8  # backing off BACKOFF_S doubling to MAX_BACKOFF_S: time for a launched server to restart
BACKOFF_S = 0.2
MAX_BACKOFF_S = 10.0


def backoff_delay_s(attempt: int, base_s: float = BACKOFF_S) -> float:
    """The wait before retry ``attempt`` (1, 2, ...), before jitter: ``base_s`` doubling, capped at
    ``MAX_BACKOFF_S`` so a long outage is polled every 10 s rather than ever more rarely."""
    return min(base_s * 2 ** (attempt - 1), MAX_BACKOFF_S)


def retry_window_s(retries: int = RETRIES, base_s: float = BACKOFF_S) -> float:
    """Total backoff of ``retries`` retries (jitter averages out): how long a server may be away unnoticed."""
    return sum(backoff_delay_s(attempt, base_s) for attempt in range(1, retries + 1))


def cli_flag(field: str) -> str:
    """How a ``serve-reward`` flag is named in a message: ``tls_cert`` -> ``--tls-cert``."""
    return "--" + field.replace("_", "-")


def check_server_tls(cert: str | None, key: str | None, client_ca: str | None, as_flags: bool = False) -> None:
    """A server's certificate comes with its key, and mutual TLS (a client CA) needs the server's own TLS.
    Raises ValueError naming the config fields, or with ``as_flags`` the ``serve-reward`` flags."""
    name = cli_flag if as_flags else str
    if bool(cert) != bool(key):
        raise ValueError(f"{name('tls_cert')} and {name('tls_key')}: give both (TLS) or neither (plaintext)")
    if client_ca and not cert:
        raise ValueError(f"{name('tls_client_ca')} (mutual TLS) needs the server's own {name('tls_cert')} and "
                         f"{name('tls_key')}")


def check_client_tls(ca: str | None, client_cert: str | None, client_key: str | None) -> None:
    """A client certificate comes with its key and is only sent over TLS, which needs the servers' CA. Fails at
    config load what would otherwise fail at the first connection, after the models loaded."""
    if bool(client_cert) != bool(client_key):
        raise ValueError("tls_client_cert and tls_client_key: give both (mutual TLS) or neither")
    if client_cert and not ca:
        raise ValueError("tls_client_cert: a client certificate is only sent over TLS; set tls_ca, the CA that "
                         "signed the servers' certificates")


def token_from_env(variable: str | None, field: str) -> str | None:
    """The bearer token held by environment variable ``variable`` (None: no token). The token itself never
    appears in a config or on a command line; a named but empty variable is an error, not "no token"."""
    if not variable:
        return None
    token = os.environ.get(variable)
    if not token:
        raise ValueError(f"{field} {variable}: that environment variable is empty or unset; export the token in "
                         "it (the servers and their clients read the same variable)")
    return token


def bearer_metadata(token: str) -> tuple[str, str]:
    """The call metadata a client sends and the server's interceptor expects (gRPC metadata keys are lowercase)."""
    return "authorization", f"Bearer {token}"


@dataclass
class ServerConfig:
    """A reward server's settings; their defaults are ``serve-reward``'s and ``reward.launch``'s."""

    host: str = "127.0.0.1"  # loopback: reachable from other machines only when asked
    port: int = 0  # 0: any free port (printed at start)
    max_batch_size: int = 16  # images in one model call
    max_wait_ms: float = 5.0  # how long a call waits for others to share its model call
    max_queue: int = 64  # Score calls admitted at once (queued or being scored); more are RESOURCE_EXHAUSTED
    max_message_mb: int = MAX_MESSAGE_MB
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: only clients with a certificate signed by this CA connect
    grace_s: float = 30.0

    def __post_init__(self) -> None:
        """Checked before a model loads, so a bad flag combination costs no model load."""
        check_server_tls(self.tls_cert, self.tls_key, self.tls_client_ca, as_flags=True)
        for field in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, field)
            if path and not Path(path).is_file():
                raise ValueError(f"{cli_flag(field)} {path}: no such file")
