"""Shared fixtures: the tiny SD-shaped model, written once per test session into a temporary cache."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TAILORPO_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))

from tailorpo.diffusion.lora import add_lora  # noqa: E402
from tailorpo.diffusion.pipeline import load_pipeline

# One intra-op thread: the tiny models' kernels are too small to gain from more, and on a busy 2-core machine an
# oversubscribed OpenMP pool made single tests 20-50x slower. Ray actors with one CPU run one thread too.
torch.set_num_threads(1)
from tailorpo.diffusion.policy import DiffusionPolicy  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_out"]


def lora_pipeline(name: str):
    """A built-in tiny pipeline with a rank-4 LoRA on attention and convolutions (seeded init)."""
    torch.manual_seed(0)
    pipe = load_pipeline(name)
    add_lora(pipe.unet, rank=4, alpha=4, target_modules=LORA_TARGETS)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe():
    return lora_pipeline("tiny-sd")


def fresh_policy(pipe, resolution: int = 64) -> DiffusionPolicy:
    """A fresh policy over a shared pipeline, with the LoRA reset to zero (= the base model)."""
    for name, param in pipe.unet.named_parameters():
        param.grad = None
        if "lora_B" in name:
            param.data.zero_()
    return DiffusionPolicy(pipe, num_steps=20, eta=1.0, guidance_scale=5.0, resolution=resolution)


@pytest.fixture
def policy(tiny_pipe):
    return fresh_policy(tiny_pipe)


@pytest.fixture(scope="session")
def sdxl_pipe():
    return lora_pipeline("tiny-sdxl")


@pytest.fixture
def sdxl_policy(sdxl_pipe):
    return fresh_policy(sdxl_pipe)


def perturb_lora(unet, seed: int = 0, scale: float = 0.05) -> None:
    """Give the LoRA non-zero weights so the policy differs from the reference."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * scale


def self_signed_cert(tmp_path, name: str) -> tuple[str, str]:
    """A self-signed certificate for localhost / 127.0.0.1 (cert path, key path)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)
