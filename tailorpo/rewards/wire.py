"""Tensors on the wire: raw little-endian bytes with shape and dtype (protos/reward.proto), never pickle."""

from __future__ import annotations

import math
import sys

import torch

from tailorpo._proto import reward_pb2

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROTOCOL_VERSION = "tailorpo.reward.v1"
MAX_ELEMENTS = 2**31  # more than a 2 GiB protobuf message can carry in any wire dtype

if sys.byteorder != "little":  # torch.frombuffer and Tensor.numpy use the host's byte order
    raise ImportError("the reward wire format is little-endian; this host is big-endian")


class WireError(ValueError):
    """A Tensor message that does not describe a valid tensor (unknown dtype, size mismatch, bad shape)."""


def tensor_to_proto(tensor: torch.Tensor, dtype: str = "float32") -> reward_pb2.Tensor:
    if dtype not in WIRE_DTYPES:
        raise WireError(f"dtype {dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    data = tensor.detach().to("cpu", WIRE_DTYPES[dtype]).contiguous()
    raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return reward_pb2.Tensor(data=raw, shape=list(data.shape), dtype=dtype)


def tensor_from_proto(message: reward_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    """Decode and check a Tensor message; errors name ``field`` and what is wrong."""
    if message.dtype not in WIRE_DTYPES:
        raise WireError(f"{field}.dtype {message.dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    shape = list(message.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{field}.shape {shape} has a negative dimension")
    # Checked before torch sees the shape: a crafted one (even with a zero dimension, so no bytes) would
    # overflow torch's size arithmetic and surface as an internal error instead of INVALID_ARGUMENT.
    if any(d > MAX_ELEMENTS for d in shape) or math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise WireError(f"{field}.shape {shape} is too large (at most 2**31 elements)")
    dtype = WIRE_DTYPES[message.dtype]
    expected = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    if len(message.data) != expected:
        raise WireError(
            f"{field}.data has {len(message.data)} bytes; shape {shape} of {message.dtype} needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(shape)
