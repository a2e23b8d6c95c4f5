"""Reward model servers: one module per reward model, one shared gRPC server core (``server.py``).

``load_reward_model(name, ...)`` builds any servable reward; each learned model's module has
``load(weights, tiny, device)``, imported only when that reward is served (or, with its default weights, built
in process by ``tailorpo.rewards.build_reward``).
"""

from __future__ import annotations

import importlib

from tailorpo.rewards import REWARDS, RewardModel

LEARNED = {
    "aesthetic": "reward_servers.aesthetic",
    "imagereward": "reward_servers.imagereward",
    "pickscore": "reward_servers.pickscore",
    "hpsv2": "reward_servers.hpsv2",
    "shapes": "reward_servers.shapes",
}
SCORE_NOTES = {
    "aesthetic": "LAION improved aesthetic predictor (sac+logos+ava1-l14-linearMSE), about 1..10; SD v1.5 ~5.7",
    "imagereward": "ImageReward, standardised (raw - 0.1672) / 1.0333; SD v1.5 ~0",
    "pickscore": "PickScore_v1, exp(logit_scale) * cosine, about 0..30; SD v1.5 ~17.7",
    "hpsv2": "HPS v2 cosine x 100; SD v1.5 ~25.8 (v2.0 and v2.1 are not comparable)",
    "shapes": "tiny-shapes prompt match: log p(color) + log p(shape) + log p(position), 0 sure, -4.5 chance",
    "jpeg": "minus the JPEG size in kB at quality 95 (DDPO compressibility)",
    "colorfulness": "Hasler-Suesstrunk colorfulness on the 0..255 scale",
}
SERVABLE = sorted([*LEARNED, *REWARDS])


def load_reward_model(name: str, weights: str | None = None, tiny: bool = False, device: str = "cpu") -> RewardModel:
    if name in REWARDS:
        return REWARDS[name]()
    if name not in LEARNED:
        raise ValueError(f"unknown reward {name!r}; servable rewards are {SERVABLE}")
    return importlib.import_module(LEARNED[name]).load(weights, tiny=tiny, device=device)
