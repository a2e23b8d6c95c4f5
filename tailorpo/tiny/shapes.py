"""The synthetic captioned images the tiny-shapes model and its classifier reward learn from.

One anti-aliased shape (``SHAPE_KINDS``) of a color (``SHAPE_COLORS``) at a position (``SHAPE_POSITIONS``) on a
flat gray background, captioned as in ``tailorpo.prompts`` ("a red circle on the left"). Everything else (the
exact place, size, hue and background) is jittered, so a caption names a distribution of images, as a real one
does. Images are a pure function of the scenes and a torch generator: the same seed draws the same data set.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tailorpo.prompts import SHAPE_COLORS, SHAPE_POSITIONS, SHAPE_SCENES, shape_caption

SHAPES_MODEL_DIR = Path(__file__).parent / "assets" / "tiny-shapes"  # the trained model shipped in the package
IMAGE_SIZE = 32  # pixels; the tiny-shapes VAE maps 32x32 images to (4, 8, 8) latents
SUPERSAMPLE = 4  # subpixels per pixel side: edges are anti-aliased as a camera would blur them
RGB = {
    "red": (0.90, 0.12, 0.10), "green": (0.15, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10), "purple": (0.60, 0.20, 0.80), "white": (0.95, 0.95, 0.95),
}
CENTERS = {  # (x, y) as fractions of the side
    "on the left": (0.27, 0.5), "on the right": (0.73, 0.5), "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73), "in the center": (0.5, 0.5),
}
PROMPT_SCENES = {shape_caption(scene): scene for scene in SHAPE_SCENES}


def scenes_of(prompts: list[str]) -> torch.Tensor:
    """Prompts -> (N, 3) long (color, kind, position) indices; KeyError names a prompt outside the grammar."""
    unknown = [p for p in prompts if p not in PROMPT_SCENES]
    if unknown:
        raise KeyError(f"not a tiny-shapes caption: {unknown[0]!r} (e.g. {shape_caption((0, 0, 0))!r})")
    return torch.tensor([PROMPT_SCENES[p] for p in prompts], dtype=torch.long)


def draw_scenes(n: int, scenes: list[tuple[int, int, int]], generator: torch.Generator) -> torch.Tensor:
    """``n`` scenes drawn uniformly from ``scenes``: (n, 3) long."""
    return torch.tensor(scenes, dtype=torch.long)[torch.randint(len(scenes), (n,), generator=generator)]


def shape_masks(kind: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Coverage in {0, 1} of each subpixel. kind (N,); dx, dy (N, S, S) offsets from the center; radius (N, 1, 1).
    Circle of radius r; square of half-side 0.85 r; upward triangle, apex at -r, base 1.8 r wide at +0.8 r."""
    circle = dx**2 + dy**2 <= radius**2
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.85 * radius
    triangle = (dy >= -radius) & (dy <= 0.8 * radius) & (dx.abs() <= (dy + radius) / 1.8)
    kind = kind.view(-1, 1, 1)
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)).float()


def render(scenes: torch.Tensor, generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 3) scenes -> (N, 3, size, size) images in [0, 1]. Jitter: center +-0.08 of the side, radius
    0.16..0.22 of it, each RGB channel +-0.06, background gray 0.05..0.40."""
    n = len(scenes)
    color, kind, position = scenes.unbind(1)
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.08
    radius = (0.16 + 0.06 * torch.rand(n, generator=generator)) * size
    rgb = torch.tensor([RGB[c] for c in SHAPE_COLORS])[color]
    rgb = (rgb + (torch.rand(n, 3, generator=generator) * 2 - 1) * 0.06).clamp(0, 1)
    background = 0.05 + 0.35 * torch.rand(n, generator=generator)
    center = (torch.tensor([CENTERS[p] for p in SHAPE_POSITIONS])[position] + offset) * size  # (N, 2) x, y
    sub = (torch.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # subpixel centers in pixel units
    dx = sub.view(1, 1, -1) - center[:, 0].view(-1, 1, 1)
    dy = sub.view(1, -1, 1) - center[:, 1].view(-1, 1, 1)
    coverage = F.avg_pool2d(shape_masks(kind, dx, dy, radius.view(-1, 1, 1))[:, None], SUPERSAMPLE)  # (N,1,H,W)
    return background.view(-1, 1, 1, 1) * (1 - coverage) + rgb.view(-1, 3, 1, 1) * coverage
