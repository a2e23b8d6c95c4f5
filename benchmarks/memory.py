"""What a run holds in memory at real size, phase by phase, and which GPU each SD recipe needs, measured on CPU.

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

Prediction. A phase's activations are modelled as B * (a + b * pixels) (B prompts, pixels = resolution^2):
(a, b) are fitted to two batch-1 resolutions, and the fit is checked against a third resolution and against
batch 2, each measured; their relative errors are printed as the method's error. The predicted GPU total of a
recipe is its weights (policy, and the reward's when its server shares the GPU) + the largest phase +
``CONTEXT_GIB`` per CUDA process (context, cuBLAS/cuDNN workspaces: an assumption, not measured here) +
``ALLOCATOR_MARGIN`` of the activations for the caching allocator's fragmentation (assumed). The reward runs in
process here, so its activations are counted inside the phases where a server would hold them at the same time.

What CPU figures cannot show: GPU kernels that need workspaces of their own (cuDNN convolution algorithms), and
attention kernels that differ (both sides use memory-linear scaled-dot-product attention in torch 2.x).

Usage: python benchmarks/memory.py [--quick] [--model-dir DIR] [--threads 2]
  --quick: 64 and 96 px fitted, checked at 128 px (batch 1 and 2), about 5 minutes; the full mode fits 256 and
  384 px and checks at 512 px (batch 1 and 2) where the machine's memory allows (a few hours on 2 cores).
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
    policy_weights: float = 0.0  # bytes: UNet (with LoRA), VAE, text encoder
    reward_weights: float = 0.0


def _module_bytes(*modules: torch.nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for m in modules for p in m.parameters()))


def measure(setting: Setting, resolution: int, batch: int, model_dir: str, threads: int) -> Measured:
    """Every phase once for ``setting`` at ``resolution`` and ``batch``, in this (fresh) process."""
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
    reward = AestheticReward(clip_vit_l14(), ScoreHead(768), "full-size random")
    reward.cast(getattr(torch, setting.reward_dtype))
    out = Measured(setting.name, resolution, batch, policy_weights=_module_bytes(
        policy.unet, policy.pipe.vae, policy.pipe.text_encoder), reward_weights=_module_bytes(reward.clip, reward.mlp))
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
    for name in PHASES:
        tick = time.perf_counter()
        with HeapPeak() as heap:
            runs[name]()
        out.seconds[name] = time.perf_counter() - tick
        if heap.growth is None:
            raise RuntimeError("glibc's mallinfo2 is unavailable: no live-heap figure on this platform")
        out.phases[name] = float(heap.growth)
    return out


# ---------------------------------------------------------------- the model B * (a + b * pixels)


def fit(low: Measured, high: Measured) -> dict[str, tuple[float, float]]:
    """Per phase (a, b) through two batch-1 measurements at different resolutions."""
    coefficients = {}
    for phase in PHASES:
        slope = (high.phases[phase] - low.phases[phase]) / (high.resolution**2 - low.resolution**2)
        coefficients[phase] = (low.phases[phase] - slope * low.resolution**2, slope)
    return coefficients


def predict(coefficients: dict[str, tuple[float, float]], resolution: int, batch: int) -> dict[str, float]:
    return {phase: batch * (a + b * resolution**2) for phase, (a, b) in coefficients.items()}


def relative_errors(predicted: dict[str, float], measured: Measured) -> dict[str, float]:
    return {phase: predicted[phase] / measured.phases[phase] - 1 for phase in PHASES}


@dataclass(frozen=True)
class Recipe:
    """A launch/ file's GPU: which phases run on it, at which batch, and whether the reward shares it."""

    name: str
    config: str  # launch/ file
    phases: tuple[str, ...]
    batch: str  # the config field that sets B
    with_reward: bool  # the reward server's weights (and a second CUDA context) on the same GPU
    extra: str = ""  # what the figure leaves out


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
           "+ CLIP-L's 1.7 GB for the weights W"),
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
    parser.add_argument("--model-dir", help="a full-size SD v1.5 folder to reuse (default: written to a temp dir)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=None,
                        help="settings to measure (default: all; --quick: bf16 + checkpointing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", metavar="JSON", help="keep each measured point here and reuse those already in it")
    parser.add_argument("--target", type=int, default=512, help="resolution of the prediction")
    add_figures_argument(parser)
    args = parser.parse_args()
    low, high, check = (64, 96, 128) if args.quick else (256, 384, 512)
    names = args.settings or (["bf16 + checkpointing"] if args.quick else list(SETTINGS))
    with tempfile.TemporaryDirectory(prefix="tailorpo-memory-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from tailorpo.tiny.full_size import make_full_size_model

            print("writing SD v1.5's architecture with random weights (float16 on disk) ...", flush=True)
            model_dir = str(make_full_size_model(Path(tmp) / "sd15", "sd15", dtype=torch.float16))
        report(args, names, (low, high, check), model_dir)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def report(args: argparse.Namespace, names: list[str], resolutions: tuple[int, int, int], model_dir: str) -> None:
    low, high, check = resolutions
    measured: dict[str, dict[tuple[int, int], Measured]] = {}
    skipped: list[str] = []
    cache = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).exists() else {}
    for name in names:
        measured[name] = points = {}
        for resolution, batch in ((low, 1), (high, 1), (check, 1), (check, 2)):
            if resolution == check:  # a check point that would not fit this machine is predicted only
                first = points[low, 1]
                need = first.policy_weights + first.reward_weights + 1.2 * max(
                    predict(fit(points[low, 1], points[high, 1]), resolution, batch).values()) + 2 * GiB
                if need > available_bytes():
                    skipped.append(f"'{name}' at {resolution} px, batch {batch} (needs ~{gib(need)} GiB)")
                    continue
            key = f"{name} @ {resolution}/{batch}"
            if key not in cache:
                print(f"measuring '{name}' at {resolution} px, batch {batch} ...", flush=True)
                cache[key] = asdict(in_spawned_process(measure, SETTINGS[name], resolution, batch, model_dir,
                                                       args.threads))
                if args.cache:  # a long full run can stop and go on where it stopped
                    Path(args.cache).write_text(json.dumps(cache, indent=1))
            points[resolution, batch] = m = Measured(**cache[key])
            print("  " + ", ".join(f"{p} {gib(v)} GiB ({m.seconds[p]:.0f} s)" for p, v in m.phases.items()),
                  flush=True)
    print(f"\nActivation peak per phase (GiB of live heap over the phase's start; weights not included), by setting "
          f"and (resolution, batch). 'fit' rows: B * (a + b * px^2) through {low} and {high} px at batch 1.")
    rows, errors, fits = [], [], {}
    for name, points in measured.items():
        fits[name] = coefficients = fit(points[low, 1], points[high, 1])
        for (resolution, batch), m in points.items():
            rows.append((name, f"{resolution}/{batch}", *(gib(m.phases[p]) for p in PHASES)))
            if resolution == check:
                errors.append(relative_errors(predict(coefficients, resolution, batch), m))
        target = predict(coefficients, args.target, 1)
        rows.append((name, f"fit {args.target}/1", *(gib(target[p]) for p in PHASES)))
    print(text_table(("setting", "px/batch", *PHASES), rows))
    if skipped:
        print("not measured here (this machine's free memory), predicted only: " + "; ".join(skipped))
    worst = max((abs(e[p]) for e in errors for p in PHASES if p != "sample"), default=float("nan"))
    if errors:
        print(f"\nThe fit's error at {check} px ({len(errors)} measured points): at most {100 * worst:.0f}% for the "
              f"phases that set a GPU's peak; 'sample': "
              f"{100 * max(abs(e['sample']) for e in errors):.0f}% (small: fixed costs dominate it).")

    largest = {name: points[max(points, key=lambda point: point[0] ** 2 * point[1])]
               for name, points in measured.items()}
    print("\nTime per phase over one guided UNet call on the same batch ('sample'), at each setting's largest "
          "measured point (CPU; relative costs carry over to a GPU roughly, absolute times do not):")
    print(text_table(("setting", "px/batch", *PHASES), [
        (name, f"{m.resolution}/{m.batch}", *(f"{m.seconds[p] / m.seconds['sample']:.1f}" for p in PHASES))
        for name, m in largest.items()]))

    print(f"\nWhat GPU a recipe needs at {args.target} px, predicted (GB = 1e9 bytes): weights + its largest phase at "
          f"the recipe's batch x {1 + ALLOCATOR_MARGIN:.2f} + {CONTEXT_GIB} GiB per CUDA process, "
          "and the smallest of " + "/".join(map(str, GPU_SIZES_GB)) + " GB that holds it:")
    table, figures = [], []
    for recipe in RECIPES:
        batch = recipe_batch(recipe)
        cells = []
        for name, points in measured.items():
            total = gpu_total(points[low, 1], predict(fits[name], args.target, batch), recipe)
            cells.append(f"{total / 1e9:.1f} ({smallest_gpu(total)})")
            if recipe is RECIPES[0]:
                figures.append(Figure(f"{recipe.name}, {name} (GB)", total / 1e9,
                                      f"launch/{recipe.config} at {args.target} px, batch {batch}: fits 24 GB if <= 24",
                                      digits=1))
        table.append((f"{recipe.name} (launch/{recipe.config}, B={batch})", *cells))
    print(text_table(("recipe", *measured), table))
    for recipe in RECIPES:
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
