"""The owner of a launched reward server (``reward.launch``), called directly as the plain class Ray wraps."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from safetensors.torch import save_file

from reward_servers import aesthetic
from tailorpo.rewards.catalogue import build_reward
from tailorpo.rewards.grpc_client import GrpcReward, RewardServerError
from tailorpo.runtime.reward_actors import RewardServerOwner
from tests.conftest import self_signed_cert

pytestmark = pytest.mark.ray

TOKEN_ENV = "TAILORPO_TEST_LAUNCH_TOKEN"


@pytest.fixture
def owner(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    cert, key = self_signed_cert(tmp_path, "server")
    owner = RewardServerOwner({"name": "jpeg", "tls_cert": cert, "tls_key": key}, TOKEN_ENV, tls_ca=cert)
    yield owner, cert
    owner.stop()


@pytest.mark.slow
def test_launched_server_takes_the_token_and_tls_and_comes_back_after_a_kill(owner):
    """The server answers only TLS clients with the token; killed with SIGKILL, it is started again on the
    same port, and a call in flight (the client retrying UNAVAILABLE) is scored by the restarted server."""
    owner, cert = owner
    address = owner.address()
    assert owner.serving()
    x = torch.rand(2, 3, 16, 16)
    client = GrpcReward([address], token="s3cret", tls_ca=cert, retries=8)
    expected = client.score(x, ["a", "b"]).scores
    with pytest.raises(RewardServerError, match="UNAUTHENTICATED"):
        GrpcReward([address], tls_ca=cert, connect_timeout_s=5.0)  # no token
    with pytest.raises(RewardServerError):
        GrpcReward([address], token="s3cret", connect_timeout_s=2.0)  # plaintext

    old_pid = owner.pid()
    os.kill(old_pid, signal.SIGKILL)
    assert torch.equal(client.score(x, ["a", "b"]).scores, expected)  # retried until the restart answers
    assert owner.pid() != old_pid and owner.restarts == 1 and owner.address() == address
    assert owner.serving()


def test_a_stopped_server_is_not_restarted(owner):
    owner, _ = owner
    owner.stop()
    time.sleep(1.0)  # several watch intervals
    assert owner.process.poll() is not None and owner.restarts == 0


@pytest.mark.slow
def test_launched_server_with_mutual_tls_is_probed_and_called_with_the_client_certificate(tmp_path):
    """tls_client_ca reaches the server; the owner's health probe, like the samplers' clients, presents
    reward.tls_client_cert (without it the handshake fails before health is asked)."""
    cert, key = self_signed_cert(tmp_path, "server")
    client_cert, client_key = self_signed_cert(tmp_path, "client")
    spec = {"name": "jpeg", "tls_cert": cert, "tls_key": key, "tls_client_ca": client_cert}
    owner = RewardServerOwner(spec, tls_ca=cert, tls_client_cert=client_cert, tls_client_key=client_key)
    try:
        assert owner.serving()
        client = GrpcReward([owner.address()], tls_ca=cert, tls_client_cert=client_cert, tls_client_key=client_key)
        assert client.score(torch.rand(1, 3, 8, 8), ["a"]).scores.shape == (1,)
        with pytest.raises(RewardServerError, match="TLS handshake failed"):
            GrpcReward([owner.address()], tls_ca=cert, connect_timeout_s=2.0)
    finally:
        owner.stop()


@pytest.mark.slow
def test_launched_server_loads_local_parts_in_bfloat16(tmp_path):
    """reward.launch's ``components`` and ``dtype`` reach ``serve-reward``: an aesthetic server from a local head
    file and a local CLIP folder (no hub id anywhere) scores as the same reward built in this process."""
    reference = aesthetic.load(None, tiny=True)
    reference.clip.save_pretrained(tmp_path / "clip")
    save_file(reference.mlp.state_dict(), str(tmp_path / "head.safetensors"))
    spec = {"name": "aesthetic", "weights": str(tmp_path / "head.safetensors"), "dtype": "bfloat16",
            "components": {"clip": str(tmp_path / "clip")}}
    local = build_reward("aesthetic", spec["weights"], dtype=torch.bfloat16, components=spec["components"])
    owner = RewardServerOwner(spec, None)
    try:
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        served = GrpcReward([owner.address()]).score(images, ["a", "b"]).scores
        same = (served - local.score(images, ["a", "b"]).scores).abs().max()  # the wire's rounding apart
        bf16_effect = (served - reference.score(images, ["a", "b"]).scores).abs().max()
        assert same < 1e-4 and bf16_effect > 10 * same, (same, bf16_effect)
    finally:
        owner.stop()
