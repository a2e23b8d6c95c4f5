"""LoRA on the UNet via peft: attach, switch off for the reference model (or at some steps), save and load strictly."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float, target_modules: list[str]) -> None:
    """Attach a trainable LoRA adapter (peft) to the UNet; the base weights stay frozen."""
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    )
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # LoRA weights train in fp32 even when the base is bf16


def lora_parameters(unet: UNet2DConditionModel) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def adapters_enabled(unet: UNet2DConditionModel) -> bool:
    """Whether the UNet's LoRA layers currently act (peft switches them all together)."""
    layer = next((m for m in unet.modules() if isinstance(m, BaseTunerLayer)), None)
    return layer is not None and not layer.disable_adapters


def adapter_aware_checkpointing(unet: UNet2DConditionModel) -> Callable[..., Any]:
    """diffusers' gradient-checkpointing function for ``unet``, recomputing each block with the LoRA switched as
    it was in the forward pass. The recomputation runs in the backward pass, after a ``reference_model`` block
    (the base model at a step the LoRA is gated off) has switched the LoRA back on: torch's own checkpoint would
    then recompute LoRA activations the forward never made (a checkpoint error, or wrong gradients)."""

    def checkpoint(block: torch.nn.Module, *args: Any) -> Any:
        enabled = adapters_enabled(unet)

        def run(*inputs: Any) -> Any:
            now = adapters_enabled(unet)
            if now == enabled:  # the forward itself, or a recompute in the same state
                return block(*inputs)
            unet.enable_adapters() if enabled else unet.disable_adapters()
            try:
                return block(*inputs)
            finally:
                unet.enable_adapters() if now else unet.disable_adapters()

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    return checkpoint


@contextmanager
def reference_model(unet: UNet2DConditionModel) -> Iterator[None]:
    """pi_ref: the same UNet with its LoRA adapter disabled. No second copy of the weights is kept. Nested
    blocks (a step-gated policy evaluated as the base model) leave the switch to the outermost one."""
    if not adapters_enabled(unet):
        yield
        return
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@dataclass(frozen=True)
class AdapterSteps:
    """The steps k (x_k -> x_{k-1}, k = num_steps..1) at which a step-gated LoRA acts; the base model acts at the
    others. A LoRA file cannot say this: ``save_lora`` writes it next to the file (ADAPTER_STEPS_FILE), and
    ``tailorpo eval`` honours it; diffusers' ``load_lora_weights`` ignores it and applies the LoRA at every step."""

    active: tuple[int, ...]
    num_steps: int


ADAPTER_STEPS_FILE = "adapter_steps.json"


def save_lora(unet: UNet2DConditionModel, directory: str | Path, steps: AdapterSteps | None = None) -> Path:
    """Save the UNet LoRA so that ``StableDiffusionPipeline.load_lora_weights(directory)`` loads it, and with
    ``steps`` the steps it is gated to (a LoRA saved ungated removes an older gate from the folder)."""
    # peft's own key names: diffusers' legacy conversion renames only attention layers, and a file that
    # mixes both namings loads partially.
    state = get_peft_model_state_dict(unet)
    # the adapter's LoraConfig goes into the file's metadata: without it load_lora_weights assumes alpha = rank
    metadata = unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=state, safe_serialization=True, unet_lora_adapter_metadata=metadata
    )
    gate = Path(directory) / ADAPTER_STEPS_FILE
    if steps is None:
        gate.unlink(missing_ok=True)
    else:
        gate.write_text(json.dumps({"active_steps": list(steps.active), "num_steps": steps.num_steps}) + "\n")
    return Path(directory)


LORA_FILE = "pytorch_lora_weights.safetensors"  # the name save_lora writes and load_lora_weights looks for
UNET_PREFIX = "unet."  # diffusers' prefix of UNet keys (and of their metadata fields) in a LoRA file


class LoraLoadError(ValueError):
    """A LoRA folder that cannot be read or does not fit the model; the message names the file and a key."""


@dataclass
class SavedLora:
    """A UNet LoRA as ``save_lora`` writes it: peft's key names, and the adapter's LoraConfig fields (``r``,
    ``lora_alpha``, ``target_modules``, ...) when the file records them (None for files saved without); ``steps``
    when it was saved step-gated (None: it acts at every step)."""

    path: Path
    state: dict[str, torch.Tensor]
    lora_config: dict[str, Any] | None
    steps: AdapterSteps | None = None


def read_adapter_steps(directory: Path) -> AdapterSteps | None:
    """The gate ``save_lora`` wrote next to the LoRA file, if any."""
    path = directory / ADAPTER_STEPS_FILE
    if not path.is_file():
        return None
    try:
        fields = json.loads(path.read_text())
        return AdapterSteps(tuple(int(k) for k in fields["active_steps"]), int(fields["num_steps"]))
    except (ValueError, KeyError, TypeError) as err:
        raise LoraLoadError(f"{path} is not a step gate as tailorpo train writes it ({err!r}); delete it to apply "
                            "the LoRA at every step") from None


def read_lora(directory: str | Path) -> SavedLora:
    """Read a saved LoRA without any model, so a wrong folder fails before a pipeline loads."""
    path = Path(directory) / LORA_FILE
    if not Path(directory).is_dir():
        raise LoraLoadError(f"LoRA folder {str(directory)!r} does not exist")
    if not path.is_file():
        raise LoraLoadError(f"{str(directory)!r} holds no {LORA_FILE}; give the lora/ folder `tailorpo train` writes")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    except (OSError, SafetensorError) as err:
        raise LoraLoadError(f"{path} is not a readable safetensors file ({err})") from None
    others = [key for key in state if not key.startswith(UNET_PREFIX)]
    if others:
        raise LoraLoadError(f"{path}: {len(others)} weights outside the UNet (e.g. {others[0]}); only UNet LoRAs "
                            "(as tailorpo train saves them) are supported")
    lora_config = None
    if "lora_adapter_metadata" in metadata:
        fields = json.loads(metadata["lora_adapter_metadata"])
        lora_config = {key.removeprefix(UNET_PREFIX): value for key, value in fields.items()}
    state = {key.removeprefix(UNET_PREFIX): value for key, value in state.items()}
    return SavedLora(path, state, lora_config, read_adapter_steps(Path(directory)))


def lora_mismatches(expected: dict[str, torch.Size], found: dict[str, torch.Size]) -> list[str]:
    """What keeps a LoRA file (key -> shape) from filling the model's adapter exactly; empty if nothing."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [f"{key} is {tuple(found[key])} in the file, {tuple(expected[key])} in the model"
                for key in expected if key in found and found[key] != expected[key]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the model's LoRA weights are not in the file, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} weights of the file have no place in the model, e.g. {unexpected[0]}")
    if reshaped:
        problems.append(f"{len(reshaped)} weights differ in shape, e.g. {reshaped[0]}")
    return problems


def load_lora(unet: UNet2DConditionModel, saved: SavedLora) -> None:
    """Fill the UNet's adapter (from ``add_lora``) with a saved LoRA, strictly: a LoRA of another model or of
    another rank or target set is refused with what does not fit, instead of loading in part."""
    expected = {key: value.shape for key, value in get_peft_model_state_dict(unet).items()}
    problems = lora_mismatches(expected, {key: value.shape for key, value in saved.state.items()})
    if problems:
        raise LoraLoadError(f"the LoRA in {saved.path} does not fit this model: {'; '.join(problems)}. Was it "
                            "trained with another model.pretrained or lora section?")
    set_peft_model_state_dict(unet, saved.state)
