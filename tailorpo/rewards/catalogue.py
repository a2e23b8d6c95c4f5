"""Every reward known by name: where its loader lives, as a ``"module:attr"`` string imported when the reward is
first built, and what must be known before it loads (whether it is differentiable, what its scores mean).

Strings, not imports: the learned rewards live in the top-level ``reward_servers`` package, which imports
``tailorpo``; naming them keeps ``tailorpo`` from importing it back, and a reward's own libraries (transformers,
open_clip) load only when that reward is built. A reward package of one's own plugs in the same way
(``"mypkg.rewards:Brightness"``).

A loader is either a ``RewardModel`` class, built without arguments (a reward with no weights), or a function
``load(weights, tiny, device, **components)`` (``weights`` None: the published checkpoint; ``tiny``: seeded random
weights of the same architecture, for tests; each component a keyword argument naming the hub id or local path of
a further part the reward loads, such as aesthetic's CLIP, so that a node without the hub can use local copies).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tailorpo.rewards.base import RewardModel


@dataclass(frozen=True)
class RewardEntry:
    loader: str  # "module:attr"
    differentiable: bool  # TailorPO-G needs d score / d image; checked against the built model by the tests
    score_notes: str  # what the scores mean, sent by the server in Info
    components: tuple[str, ...] = ()  # the loader's keyword arguments for further parts (hub id or local path)


CATALOGUE: dict[str, RewardEntry] = {
    "aesthetic": RewardEntry(
        "reward_servers.aesthetic:load", True,
        "LAION improved aesthetic predictor (sac+logos+ava1-l14-linearMSE), about 1..10; SD v1.5 ~5.7", ("clip",)),
    "imagereward": RewardEntry(
        "reward_servers.imagereward:load", True, "ImageReward, standardised (raw - 0.1672) / 1.0333; SD v1.5 ~0",
        ("tokenizer",)),
    "pickscore": RewardEntry(
        "reward_servers.pickscore:load", True, "PickScore_v1, exp(logit_scale) * cosine, about 0..30; SD v1.5 ~17.7",
        ("tokenizer",)),
    "hpsv2": RewardEntry(
        "reward_servers.hpsv2:load", True, "HPS v2 cosine x 100; SD v1.5 ~25.8 (v2.0 and v2.1 are not comparable)"),
    "shapes": RewardEntry(
        "reward_servers.shapes:load", True,
        "tiny-shapes prompt match: log p(color) + log p(shape) + log p(position), 0 sure, -4.5 chance"),
    "jpeg": RewardEntry(
        "tailorpo.rewards.jpeg:JpegCompressibility", False,
        "minus the JPEG size in kB at quality 95 (DDPO compressibility)"),
    "colorfulness": RewardEntry(
        "tailorpo.rewards.colorfulness:Colorfulness", True, "Hasler-Suesstrunk colorfulness on the 0..255 scale"),
}
REWARD_NAMES = tuple(sorted(CATALOGUE))
SERVER = "reward_servers.server:serve_forever"  # the gRPC server core every reward runs behind (serve-reward)


def resolve(target: str, field: str = "reward.name") -> Any:
    """The object a ``"module:attr"`` string names, importing its module now. Raises ValueError naming ``field``
    (where the string came from) and why: a malformed string, a module that does not import, a missing name."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr.isidentifier():
        raise ValueError(f"{field}: {target!r} is not 'module:attr' (e.g. 'mypkg.rewards:Brightness')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{field}: {target!r}: cannot import {module_name!r} ({err}); install the package that "
                         "provides it or correct the name") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{field}: {target!r}: module {module_name!r} has no {attr!r}") from None


def reward_entry(name: str, field: str = "reward.name") -> RewardEntry:
    """The catalogue's entry for ``name``; ValueError naming ``field`` and the choices when there is none."""
    if name not in CATALOGUE:
        raise ValueError(f"{field}: unknown reward {name!r}; choose one of {', '.join(REWARD_NAMES)}")
    return CATALOGUE[name]


def is_differentiable(name: str) -> bool:
    """Whether reward ``name`` returns gradients, known before it loads."""
    return reward_entry(name).differentiable


def check_components(name: str, components: Mapping[str, str], field: str) -> None:
    """ValueError naming ``field`` and reward ``name``'s parts when ``components`` names another."""
    known = reward_entry(name).components
    if unknown := sorted(set(components) - set(known)):
        parts = f"its parts are: {', '.join(known)}" if known else "it loads no further parts"
        raise ValueError(f"{field}: reward {name!r} has no component {', '.join(map(repr, unknown))}; {parts}")


def build_reward(
    name: str,
    weights: str | None = None,
    tiny: bool = False,
    device: str = "cpu",
    field: str = "reward.name",
    dtype: torch.dtype | None = None,
    components: Mapping[str, str] | None = None,
    components_field: str | None = None,
) -> RewardModel:
    """Reward ``name`` in this process: its published weights, ``weights``, or with ``tiny`` seeded random ones,
    its further parts from ``components`` (defaults: the published ones), its weights cast to ``dtype``.
    A reward without weights (a class in the catalogue) ignores ``weights``, ``tiny`` and ``dtype``. Errors name
    ``field`` (``components_field`` for a part the reward does not have, when the caller has its own name)."""
    components = dict(components or {})
    check_components(name, components, components_field or field)
    loader = resolve(reward_entry(name, field).loader, field)
    if isinstance(loader, type):
        return loader()
    model = loader(weights, tiny=tiny, device=device, **components)
    if dtype is not None:
        model.cast(dtype)
    return model
