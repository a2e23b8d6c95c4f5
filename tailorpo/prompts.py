"""Prompt sets. ``SIMPLE_ANIMALS`` is the animal-name list of DDPO's ``simple_animals`` prompt function
(ddpo-pytorch ``assets/simple_animals.txt``), which D3PO and the TailorPO paper train on."""

SIMPLE_ANIMALS: list[str] = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo", "snail", "hippopotamus", "cheetah", "crocodile", "lobster", "octopus"]  # noqa: E501

# The tiny-shapes model's captions (tailorpo/tiny/shapes.py draws them): one shape of a color at a position,
# "a red circle on the left". SHAPE_HELD_OUT are combinations the model never saw in pretraining, though each
# of their words and each pair of their attributes did occur (color = (shape + position) mod 6, a Latin-square
# rule, so each (shape, position), (color, shape) and (color, position) pair loses at most one combination):
# prompt generalization as the paper's Table 3 measures it (train vs unseen prompts).
SHAPE_COLORS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPE_KINDS = ("circle", "square", "triangle")
SHAPE_POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
SHAPE_SCENES: list[tuple[int, int, int]] = [
    (color, kind, position)
    for color in range(len(SHAPE_COLORS))
    for kind in range(len(SHAPE_KINDS))
    for position in range(len(SHAPE_POSITIONS))
]


def shape_caption(scene: tuple[int, int, int]) -> str:
    color, kind, position = scene
    return f"a {SHAPE_COLORS[color]} {SHAPE_KINDS[kind]} {SHAPE_POSITIONS[position]}"


def shape_held_out(scene: tuple[int, int, int]) -> bool:
    color, kind, position = scene
    return color == (kind + position) % len(SHAPE_COLORS)


SHAPE_TRAIN: list[str] = [shape_caption(s) for s in SHAPE_SCENES if not shape_held_out(s)]  # 75 prompts
SHAPE_HELD_OUT: list[str] = [shape_caption(s) for s in SHAPE_SCENES if shape_held_out(s)]  # 15 prompts
