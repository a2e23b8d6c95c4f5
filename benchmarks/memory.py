"""What a run holds in memory at real size, phase by phase, and which GPU each launch/ recipe needs, on a CPU.

No GPU is needed: memory depends on the architecture, the dtype, the resolution and the batch, not on the
weights' values. The script writes SD v1.5's published architecture with random weights
(``tailorpo make-tiny-model --full-size sd15``), loads it through the normal config path (``build_policy``: the
recipe's ``model.dtype``, ``optim.mixed_precision``, ``model.gradient_checkpointing``, ``model.vae_slicing``), adds
the aesthetic reward at real size (CLIP ViT-L/14 + its MLP, random weights) in process, and runs each phase of a
TailorPO-G run once, with the code a run uses:

- sample:     one classifier-free guided UNet call on the batch, no grad;
- branch:     a branching step (``branch_step``): 2 children per prompt, their UNet call at t-1, decode, reward;
- guidance:   TailorPO-G's push of the winners (``guide_winners``): a backward through the UNet at t-1, the VAE
              decoder and the reward (in ``algorithm.guidance.chunk_size`` rows at a time);
- learn:      a TailorPO learner step on the batch's pairs (reference forward, trainable forward, backward, AdamW);
- learn_d3po: the same for D3PO's pairs (x^w and x^l from two trajectories: twice the UNet rows);
- eval:       the end-of-run evaluation's largest call: ``eval.batch_size`` images, a guided UNet call and a decode;
- pairs_dpo:  a Diffusion-DPO step on B pairs of images (``PairLearner``: VAE encode, reference and trainable
              UNet forwards on both images, backward, AdamW), as the offline pair recipes train.

Each figure is the phase's peak of live heap bytes over those at its start (glibc ``mallinfo2``, sampled every
0.2 ms by a thread: the CPU's counterpart of CUDA's ``max_memory_allocated``), one process per setting.

Prediction. A phase's activations are modelled as a + B * b * pixels (B prompts, pixels = resolution^2; a holds
what does not grow with the image, such as the bf16 copies of fp32 weights that autocast keeps for the backward
and the reward's graph at its own 224 px): (a, b) are fitted to two batch-1 resolutions, and the fit is checked
against a third resolution at batch 1 and 2, each measured; the signed errors are printed as the method's error.
A recipe's figure uses the measurements at its resolution where they exist (linear in the batch through batch 1
and 2), the fit elsewhere. The predicted GPU total of a
recipe is its weights (policy, and the reward's when its server shares the GPU) + the largest phase +
``CONTEXT_GIB`` per CUDA process (context, cuBLAS/cuDNN workspaces: an assumption, not measured here) +
``ALLOCATOR_MARGIN`` of the activations for the caching allocator's fragmentation (assumed). The reward runs in
process here, so its activations are counted inside the phases where a server would hold them at the same time.

What CPU figures cannot show: GPU kernels that need workspaces of their own (cuDNN convolution algorithms), and
attention kernels that differ (both sides use memory-linear scaled-dot-product attention in torch 2.x).

``--model sdxl`` does the same for SDXL base 1.0's architecture and its pair recipe (the pair step only).

Usage: python benchmarks/memory.py [--quick] [--model sd15|sdxl] [--model-dir DIR] [--cache JSON] [--threads 2]
  --quick: 64 and 96 px fitted, checked at 128 px (batch 1 and 2), one setting, about 5 minutes: every phase
  runs at real size, but its 512 px figures are a 16-28x extrapolation in pixels and fall short; the full mode
  fits 256 and 384 px and checks at 512 px (batch 1 and 2) where this machine's memory allows, each setting
  about 20 minutes on 2 cores (``--cache`` keeps each point, so a stopped run goes on where it stopped).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common import Figure, HeapPeak, add_figures_argument, in_spawned_process, text_table, write_figures

GiB = 2**30
CONTEXT_GIB = 0.75  # per CUDA process: context + library workspaces (typical 0.5-1 GiB with torch 2.x)
ALLOCATOR_MARGIN = 0.10  # the caching allocator reserves more than it hands out
GPU_SIZES_GB = (16, 24, 40, 48, 80)
PHASES = ("sample", "branch", "guidance", "learn", "learn_d3po", "eval", "pairs_dpo")
MODELS = {"sd15": PHASES, "sdxl": ("pairs_dpo",)}  # the phases each architecture's recipes run
TARGETS = {"sd15": 512, "sdxl": 1024}  # the recipes' resolution
PROMPT = "a photograph of an astronaut riding a horse"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setting:
    """A memory recipe: what build_policy and the guidance are told (a launch file's choices)."""

    name: str
    dtype: str = "float32"  # model.dtype
    mixed_precision: str = "bf16"  # optim.mixed_precision
    checkpointing: tuple[str, ...] = ()  # model.gradient_checkpointing
    chunk: int | None = None  # algorithm.guidance.chunk_size
    reward_dtype: str = "float32"

    def overrides(self, resolution: int, batch: int, model_dir: str) -> list[str]:
        ckpt = "[" + ",".join(self.checkpointing) + "]"
        return [f"model.pretrained={model_dir}", f"model.resolution={resolution}", f"sampling.batch_size={batch}",
                f"model.dtype={self.dtype}", f"optim.mixed_precision={self.mixed_precision}",
                f"model.gradient_checkpointing={ckpt}", "model.vae_slicing=true", "device=cpu",
                f"algorithm.guidance.chunk_size={self.chunk if self.chunk else 'null'}", "algorithm.name=tailorpo_g",
                "reward.name=colorfulness", "reward.launch=[]", "runtime.samplers=0"]


SETTINGS = {  # in the order they are measured: the likeliest answers first
    s.name: s for s in (
        Setting("bf16 + checkpointing", dtype="bfloat16", checkpointing=("unet", "vae")),
        Setting("fp32 weights, bf16 autocast"),
        Setting("bf16 weights", dtype="bfloat16"),
        Setting("fp32 + checkpointing", checkpointing=("unet", "vae")),
        Setting("bf16 + checkpointing + chunk 1", dtype="bfloat16", checkpointing=("unet", "vae"), chunk=1,
                reward_dtype="bfloat16"),
    )
}


@dataclass
class Measured:
    """One setting at one (resolution, batch): each phase's activation peak and time, and the weights."""

    setting: str
    resolution: int
    batch: int
    phases: dict[str, float] = field(default_factory=dict)  # bytes
    seconds: dict[str, float] = field(default_factory=dict)
    policy_weights: float = 0.0  # bytes: every module of the pipeline (UNet with its LoRA, VAE, text encoders)
    reward_weights: float = 0.0


def _module_bytes(*modules: torch.nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for m in modules for p in m.parameters()))


def measure(setting: Setting, resolution: int, batch: int, model_dir: str, threads: int,
            phases: tuple[str, ...] = PHASES) -> Measured:
    """Each of ``phases`` once for ``setting`` at ``resolution`` and ``batch``, in this (fresh) process."""
    from reward_servers.aesthetic import AestheticReward
    from reward_servers.heads import ScoreHead
    from tailorpo.algorithms.branching import branch_step, guidance_schedule, guide_winners
    from tailorpo.algorithms.learner import Learner
    from tailorpo.algorithms.pair_learner import DIFFUSION_DPO, PairLearner
    from tailorpo.algorithms.rollouts import Rollout, stack_pairs
    from tailorpo.config import load_config
    from tailorpo.pairs.data import PairBatch
    from tailorpo.tiny.full_size import clip_vit_l14
    from tailorpo.training.build import build_policy

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(str(ROOT / "launch" / "tailorpo.yaml"), setting.overrides(resolution, batch, model_dir))
    policy = build_policy(cfg, torch.device("cpu"))
    out = Measured(setting.name, resolution, batch, policy_weights=_module_bytes(
        *(m for m in policy.pipe.components.values() if isinstance(m, torch.nn.Module))))
    if {"branch", "guidance"} & set(phases):  # the phases that score images
        reward = AestheticReward(clip_vit_l14(), ScoreHead(768), "full-size random")
        reward.cast(getattr(torch, setting.reward_dtype))
        out.reward_weights = _module_bytes(reward.clip, reward.mlp)
    prompts = [PROMPT] * batch
    generator = torch.Generator().manual_seed(0)
    embeds = policy.encode_prompts(prompts)
    i = policy.num_steps - 12  # k = 12, a fine-tuned step of every recipe: all steps cost the same
    x = policy.initial_latents(batch, generator)
    learner = Learner(policy, cfg.optim, cfg.algorithm)
    state: dict = {}

    def sample() -> None:
        with torch.no_grad():
            state["eps"] = policy.eps(x, i, embeds)

    def branch() -> None:
        with torch.no_grad():
            state["branched"] = branch_step(policy, reward, i, x, state["eps"], embeds, prompts, generator,
                                            cfg.algorithm.branching, None, cfg.algorithm.guidance)

    def guidance() -> None:
        eta = guidance_schedule(cfg.algorithm.guidance, [policy.num_steps - i])[policy.num_steps - i]
        branched = state["branched"]
        guide_winners(policy, reward, i, branched.pair["x_w"], branched.eps, embeds, prompts, eta,
                      cfg.algorithm.guidance)

    def pairs(shared_parent: bool) -> Rollout:
        pair = state["branched"].pair | {"prompt": torch.arange(batch), "valid": torch.ones(batch, dtype=torch.bool)}
        if not shared_parent:  # D3PO: the loser's x_t is another trajectory's
            pair["x_t_l"] = policy.initial_latents(batch, generator)
        return Rollout(prompts, torch.empty(0), torch.empty(0), stack_pairs([pair], shared_parent))

    def evaluate() -> None:
        rows = cfg.eval.batch_size
        latents = policy.initial_latents(rows, generator)
        with torch.no_grad():
            policy.eps(latents, i, policy.encode_prompts([PROMPT] * rows))
            policy.decode(latents)

    def pairs_dpo() -> None:
        images = torch.rand(2, batch, 3, resolution, resolution, generator=generator) * 2 - 1
        PairLearner(policy, cfg.optim, DIFFUSION_DPO, cfg.pairs).train_on(
            PairBatch(torch.arange(batch), prompts, images[0], images[1]), noise=generator)

    runs = {"sample": sample, "branch": branch, "guidance": guidance,
            "learn": lambda: learner.train_on(pairs(shared_parent=True)),
            "learn_d3po": lambda: learner.train_on(pairs(shared_parent=False)), "eval": evaluate,
            "pairs_dpo": pairs_dpo}
    for name in phases:
        tick = time.perf_counter()
        with HeapPeak() as heap:
            runs[name]()
        out.seconds[name] = time.perf_counter() - tick
        if heap.growth is None:
            raise RuntimeError("glibc's mallinfo2 is unavailable: no live-heap figure on this platform")
        out.phases[name] = float(heap.growth)
    return out


# ---------------------------------------------------------------- the model a + B * b * pixels


def fit(low: Measured, high: Measured) -> dict[str, tuple[float, float]]:
    """Per phase (a, b) through two batch-1 measurements at different resolutions."""
    coefficients = {}
    for phase in low.phases:
        slope = (high.phases[phase] - low.phases[phase]) / (high.resolution**2 - low.resolution**2)
        coefficients[phase] = (low.phases[phase] - slope * low.resolution**2, slope)
    return coefficients


def predict(coefficients: dict[str, tuple[float, float]], resolution: int, batch: int) -> dict[str, float]:
    """a + B * b * px^2: what does not depend on the image (copies of weights, the reward's own graph at its
    fixed size) once, the activations per image B times; the eval's batch is eval.batch_size, not B."""
    return {phase: a + (1 if phase == "eval" else batch) * b * resolution**2
            for phase, (a, b) in coefficients.items()}


def at_batch(points: dict[tuple[int, int], Measured], coefficients: dict[str, tuple[float, float]], resolution: int,
             batch: int) -> dict[str, float]:
    """Each phase at ``resolution`` and ``batch``: the measurement there at batch 1 plus B - 1 times the cost of
    one more image (measured at this resolution, or at the largest smaller one measured at batch 1 and 2 and
    scaled by the pixels), or the fit alone where nothing was measured at this resolution."""
    one = points.get((resolution, 1))
    if one is None:
        return predict(coefficients, resolution, batch)
    paired = [r for r, b in points if b == 2 and (r, 1) in points and r <= resolution]
    if not paired:
        slope = {p: b * resolution**2 for p, (_, b) in coefficients.items()}
    else:
        r = max(paired)
        slope = {p: (points[r, 2].phases[p] - points[r, 1].phases[p]) * resolution**2 / r**2 for p in one.phases}
    return {p: one.phases[p] + (batch - 1) * max(slope[p], 0.0) for p in one.phases}


def relative_errors(predicted: dict[str, float], measured: Measured) -> dict[str, float]:
    return {phase: predicted[phase] / measured.phases[phase] - 1 for phase in measured.phases}


@dataclass(frozen=True)
class Recipe:
    """A launch/ file's GPU: which phases run on it, at which batch, and whether the reward shares it."""

    name: str
    config: str  # launch/ file
    phases: tuple[str, ...]
    batch: str  # the config field that sets B
    with_reward: bool  # the reward server's weights (and a second CUDA context) on the same GPU
    extra: str = ""  # how to read the figure
    model: str = "sd15"  # the architecture it trains
    clip_weights: bool = False  # Diff-contrast's CLIP ViT-L/14 embedder in the same process (the aesthetic's size)


ONLINE = ("sample", "branch", "learn", "eval")
RECIPES = (
    Recipe("TailorPO-G, one GPU with the reward server", "paper_sd15.yaml", (*ONLINE, "guidance"),
           "sampling.batch_size", True),
    Recipe("TailorPO, one GPU with the reward server", "paper_sd15.yaml", ONLINE, "sampling.batch_size", True),
    Recipe("D3PO, one GPU with the reward server", "paper_sd15.yaml", (*ONLINE, "learn_d3po"),
           "sampling.batch_size", True),
    Recipe("TailorPO-G on Ray: the sampler's GPU", "tailorpo.yaml", ("sample", "branch", "guidance"),
           "sampling.batch_size", False),
    Recipe("TailorPO on Ray: the learner's GPU", "tailorpo.yaml", ("learn",), "sampling.batch_size", False),
    Recipe("Diffusion-DPO on pairs", "dpo_sd15.yaml", ("pairs_dpo",), "pairs.batch_size", False,
           "the eval's reward server elsewhere"),
    Recipe("Diff-contrast on pairs", "diff_contrast_sd15.yaml", ("pairs_dpo",), "pairs.batch_size", False,
           "Diffusion-DPO's step and CLIP ViT-L/14's weights (its embeddings are cached: no CLIP graph)",
           clip_weights=True),
    Recipe("MaPO on pairs", "mapo_sdxl.yaml", ("pairs_dpo",), "pairs.batch_size", False,
           "Diffusion-DPO's step measured: MaPO's lacks the reference forward, freed before the backward anyway",
           model="sdxl"),
)


def recipe_batch(recipe: Recipe) -> int:
    from tailorpo.config import load_config

    section, name = recipe.batch.split(".")
    with warnings.catch_warnings():  # the paper's preset warns of its untrained steps: not this script's concern
        warnings.simplefilter("ignore")
        return getattr(getattr(load_config(str(ROOT / "launch" / recipe.config)), section), name)


def gpu_total(weights: Measured, activations: dict[str, float], recipe: Recipe) -> float:
    """Predicted bytes on the GPU: weights + the largest phase with the allocator margin + the CUDA contexts."""
    peak = max(activations[p] for p in recipe.phases) * (1 + ALLOCATOR_MARGIN)
    total = weights.policy_weights + peak + CONTEXT_GIB * GiB
    if recipe.with_reward:
        total += weights.reward_weights + CONTEXT_GIB * GiB
    if recipe.clip_weights:
        total += weights.reward_weights
    return total


def smallest_gpu(total: float) -> str:
    fits = [size for size in GPU_SIZES_GB if total <= size * 1e9]
    return f"{fits[0]} GB" if fits else f"> {GPU_SIZES_GB[-1]} GB"


# ---------------------------------------------------------------- report


def gib(value: float) -> str:
    return f"{value / GiB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64/96 px fitted, checked at 128 px")
    parser.add_argument("--model", choices=list(MODELS), default="sd15",
                        help="SD v1.5 (every phase) or SDXL (the pair step of its pair recipe)")
    parser.add_argument("--model-dir", help="a --full-size folder of --model to reuse (default: written to a temp dir)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=None,
                        help="settings to measure (default: all; --quick: bf16 + checkpointing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", metavar="JSON", help="keep each measured point here and reuse those already in it")
    parser.add_argument("--also", nargs="+", default=[], metavar="PX/BATCH", type=point_argument,
                        help="more points to measure, e.g. 1024/1 (SDXL at its recipe's resolution)")
    add_figures_argument(parser)
    args = parser.parse_args()
    names = args.settings or (["bf16 + checkpointing"] if args.quick else list(SETTINGS))
    with tempfile.TemporaryDirectory(prefix="tailorpo-memory-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from tailorpo.tiny.full_size import make_full_size_model

            print(f"writing {args.model}'s architecture with random weights (float16 on disk) ...", flush=True)
            model_dir = str(make_full_size_model(Path(tmp) / args.model, args.model, dtype=torch.float16))
        measured, skipped = measure_points(args, names, model_dir)
        report(args, measured, skipped)


def point_argument(value: str) -> tuple[int, int]:
    resolution, _, batch = value.partition("/")
    return int(resolution), int(batch or 1)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def resolutions(quick: bool) -> tuple[int, int, int]:
    """(low, high) fitted at batch 1, checked at the third (batch 1 and 2)."""
    return (64, 96, 128) if quick else (256, 384, 512)


def measure_points(
    args: argparse.Namespace, names: list[str], model_dir: str
) -> tuple[dict[str, dict[tuple[int, int], Measured]], list[str]]:
    """Each setting at the fitted and checked points, each in a fresh process; a check point that would not
    fit this machine's free memory is skipped (predicted only) and named."""
    low, high, check = resolutions(args.quick)
    cache = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).exists() else {}
    measured: dict[str, dict[tuple[int, int], Measured]] = {}
    skipped: list[str] = []
    for name in names:
        measured[name] = points = {}
        for resolution, batch in ((low, 1), (high, 1), (check, 1), (check, 2), *args.also):
            key = f"{args.model} {name} @ {resolution}/{batch}"
            if key not in cache and resolution >= check:  # a point already measured is kept whatever is free now
                first = points[low, 1]
                need = first.policy_weights + first.reward_weights + 1.2 * max(
                    predict(fit(points[low, 1], points[high, 1]), resolution, batch).values()) + 2 * GiB
                if need > available_bytes():
                    skipped.append(f"'{name}' at {resolution} px, batch {batch} (needs ~{gib(need)} GiB)")
                    continue
            if key not in cache:
                print(f"measuring '{name}' at {resolution} px, batch {batch} ...", flush=True)
                cache[key] = asdict(in_spawned_process(measure, SETTINGS[name], resolution, batch, model_dir,
                                                       args.threads, MODELS[args.model]))
                if args.cache:  # a long full run can stop and go on where it stopped
                    Path(args.cache).write_text(json.dumps(cache, indent=1))
            points[resolution, batch] = m = Measured(**cache[key])
            print(f"  {name} {resolution}/{batch}: " + ", ".join(
                f"{p} {gib(v)} GiB ({m.seconds[p]:.0f} s)" for p, v in m.phases.items()), flush=True)
    return measured, skipped


def report(args: argparse.Namespace, measured: dict[str, dict[tuple[int, int], Measured]],
           skipped: list[str]) -> None:
    low, high, check = resolutions(args.quick)
    phases, target_px = MODELS[args.model], TARGETS[args.model]
    print(f"\nActivation peak per phase (GiB of live heap over the phase's start; weights not included), by setting "
          f"and (resolution, batch). 'fit' rows: a + B * b * px^2 through {low} and {high} px at batch 1.")
    rows, errors, fits = [], [], {}
    for name, points in measured.items():
        fits[name] = coefficients = fit(points[low, 1], points[high, 1])
        for (resolution, batch), m in points.items():
            rows.append((name, f"{resolution}/{batch}", *(gib(m.phases[p]) for p in phases)))
            if resolution >= check:
                errors.append((f"{name} {resolution}/{batch}", relative_errors(predict(coefficients, resolution,
                                                                                        batch), m)))
        target = predict(coefficients, target_px, 1)
        rows.append((name, f"fit {target_px}/1", *(gib(target[p]) for p in phases)))
    print(text_table(("setting", "px/batch", *phases), rows))
    if skipped:
        print("not measured here (this machine's free memory), predicted only: " + "; ".join(skipped))
    peaks = [p for p in phases if p != "sample"]  # 'sample' is small next to the others: fixed costs dominate it
    if errors:
        print(f"\nThe fit's signed error (predicted / measured - 1) at {check} px, the phases that can set a GPU's "
              "peak (> 0: the fit overestimates, the safe side):")
        print(text_table(("point", *peaks), [(label, *(f"{100 * e[p]:+.0f}%" for p in peaks))
                                             for label, e in errors]))
    worst = max((abs(e[p]) for _, e in errors for p in peaks), default=float("nan"))
    largest = {name: points[max(points, key=lambda point: point[0] ** 2 * point[1])]
               for name, points in measured.items()}
    if "sample" in phases:
        print("\nTime per phase over one guided UNet call on the same batch ('sample'), at each setting's largest "
              "measured point (CPU; relative costs carry over to a GPU roughly, absolute times do not):")
        print(text_table(("setting", "px/batch", *phases), [
            (name, f"{m.resolution}/{m.batch}", *(f"{m.seconds[p] / m.seconds['sample']:.1f}" for p in phases))
            for name, m in largest.items()]))

    print(f"\nWhat GPU a recipe needs at {target_px} px, predicted (GB = 1e9 bytes): weights + its largest phase at "
          f"the recipe's batch (measured at {target_px} px where it was, linear in the batch) x "
          f"{1 + ALLOCATOR_MARGIN:.2f} + {CONTEXT_GIB} GiB per CUDA process, and the smallest of "
          + "/".join(map(str, GPU_SIZES_GB)) + " GB that holds it:")
    table, figures = [], []
    recipes = [r for r in RECIPES if r.model == args.model]
    for recipe in recipes:
        batch = recipe_batch(recipe)
        cells = []
        for name, points in measured.items():
            total = gpu_total(points[low, 1], at_batch(points, fits[name], target_px, batch), recipe)
            cells.append(f"{total / 1e9:.1f} ({smallest_gpu(total)})")
            if recipe is recipes[0]:
                figures.append(Figure(f"{recipe.name}, {name} (GB)", total / 1e9,
                                      f"launch/{recipe.config} at {target_px} px, batch {batch}: fits 24 GB if <= 24",
                                      digits=1))
        table.append((f"{recipe.name} (launch/{recipe.config}, B={batch})", *cells))
    print(text_table(("recipe", *measured), table))
    for recipe in recipes:
        if recipe.extra:
            print(f"  {recipe.name}: {recipe.extra}")
    print("Weights (GB): " + "; ".join(
        f"{name}: policy {m.policy_weights / 1e9:.2f}, reward {m.reward_weights / 1e9:.2f}"
        for name, m in largest.items()))
    figures.append(Figure(f"fit error at {check} px (%)", 100 * worst,
                          "largest |predicted / measured - 1| of the phases that set a GPU's peak", digits=0))
    write_figures(args.figures, figures)


if __name__ == "__main__":
    main()
