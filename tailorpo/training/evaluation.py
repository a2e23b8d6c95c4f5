"""``tailorpo eval``: a trained LoRA against its base model, as the paper evaluates (Sec. 5: five images per
prompt, the mean reward of all images), plus the win rate of the LoRA's images over the base model's.

Both models render every (prompt, image index) from the same noise (``training.loop.evaluate``, the sampler of the
end-of-run eval), so each LoRA image has a base twin and the win rate compares like with like. With several
reward servers each reward is reported on its own and as the weighted sum the run trained on.
"""

from __future__ import annotations

import csv
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import torch
from PIL import Image

from tailorpo.config import Config, ConfigError, LoraSettings
from tailorpo.diffusion.lora import SavedLora, load_lora, read_lora
from tailorpo.training.build import build_policy, build_reward_model, resolve_device
from tailorpo.training.loop import compare_with_base
from tailorpo.training.run_log import GRID_PROMPTS, comparison_grid

REPORT_FILES = ("results.csv", "results.md", "grid.png")


def mean_std(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over the last dim, (..., I) -> (...,); population std, as the run log's."""
    return scores.mean(-1), scores.std(-1, unbiased=False)


def win_rate(lora: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Share of paired images (same noise) where the LoRA's reward beats the base model's, ties counting 1/2,
    over the last dim: (..., I) -> (...,). A model against itself scores exactly 0.5."""
    return ((lora > base).float() + 0.5 * (lora == base).float()).mean(-1)


@dataclass
class ResultRow:
    """One reward on one prompt (or on all of them, ``prompt == "all"``): base vs LoRA over paired images."""

    reward: str
    prompt: str
    images: int
    base_mean: float
    base_std: float
    lora_mean: float
    lora_std: float
    win_rate: float


def result_rows(prompts: list[str], base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> list[ResultRow]:
    """Per reward, a row per prompt and one for all images; scores are (P * I,) prompt-major, as evaluate's."""
    rows = []
    for name, base_scores in base.items():
        base_pi, lora_pi = base_scores.view(len(prompts), -1), lora[name].view(len(prompts), -1)  # (P, I)
        groups = [*zip(prompts, base_pi, lora_pi, strict=True), ("all", base_pi.flatten(), lora_pi.flatten())]
        for prompt, base_i, lora_i in groups:
            (base_mean, base_std), (lora_mean, lora_std) = mean_std(base_i), mean_std(lora_i)
            rows.append(ResultRow(name, prompt, len(base_i), float(base_mean), float(base_std), float(lora_mean),
                                  float(lora_std), float(win_rate(lora_i, base_i))))
    return rows


def markdown_table(rows: list[ResultRow]) -> str:
    lines = ["| reward | prompt | images | base mean | base std | LoRA mean | LoRA std | LoRA win rate |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        prompt = r.prompt.replace("|", "\\|")
        lines.append(f"| {r.reward} | {prompt} | {r.images} | {r.base_mean:.4f} | {r.base_std:.4f} | "
                     f"{r.lora_mean:.4f} | {r.lora_std:.4f} | {r.win_rate:.3f} |")
    return "\n".join(lines)


def write_report(out: Path, rows: list[ResultRow], grid: Image.Image, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([field.name for field in fields(ResultRow)])
        writer.writerows(astuple(row) for row in rows)
    (out / "results.md").write_text(f"{header}\n\n{markdown_table(rows)}\n")
    grid.save(out / "grid.png")


def refuse_launched_servers(cfg: Config) -> None:
    """Reward servers that a Ray job would launch cannot be reached from one process: say how to start them."""
    if not cfg.reward.launch:
        return
    commands = [f"tailorpo serve-reward {spec.name} --device {spec.device} --port {50051 + i}"
                + (f" --weights {spec.weights}" if spec.weights else "") + (" --tiny" if spec.tiny else "")
                for i, spec in enumerate(cfg.reward.launch)]
    servers = ", ".join(f"{{addresses: ['127.0.0.1:{50051 + i}'], weight: {spec.weight:g}}}"
                        for i, spec in enumerate(cfg.reward.launch))
    raise ConfigError(
        "reward.launch: tailorpo eval runs in one process and starts no reward servers; start them with\n  "
        + "\n  ".join(commands) + f"\nand add --set reward.launch=[] --set \"reward.servers=[{servers}]\""
    )


def lora_settings(cfg: Config, saved: SavedLora) -> Config:
    """The config with the LoRA's own rank, alpha and targets when its file records them, and the steps it acts
    at (its folder's adapter_steps.json; without one, every step). Older files: the config's lora section,
    which must then match the run's; alpha cannot be checked."""
    if saved.lora_config is None:
        return cfg
    saved_config, steps = saved.lora_config, saved.steps
    if steps is not None and steps.num_steps != cfg.sampling.num_steps:
        raise ConfigError(f"sampling.num_steps: the LoRA in {saved.path.parent} acts at steps {list(steps.active)} "
                          f"of a {steps.num_steps}-step chain; evaluate it with sampling.num_steps={steps.num_steps}")
    lora = LoraSettings(rank=saved_config["r"], alpha=saved_config["lora_alpha"],
                        target_modules=sorted(saved_config["target_modules"]),
                        active_steps="all" if steps is None else list(steps.active))
    return cfg.model_copy(update={"lora": lora})


def run_eval(cfg: Config, lora_dir: Path, out: Path) -> list[ResultRow]:
    """Render the eval prompts with the base model and with the LoRA from ``lora_dir`` on the same noise,
    score them with the config's rewards, and write results.csv, results.md and grid.png to ``out``."""
    refuse_launched_servers(cfg)
    saved = read_lora(lora_dir)  # a wrong folder fails before any model loads
    cfg = lora_settings(cfg, saved)
    reward = build_reward_model(cfg)
    try:
        policy = build_policy(cfg, resolve_device(cfg.device))
        load_lora(policy.unet, saved)
        base, lora = compare_with_base(policy, reward, cfg.eval)
    finally:
        reward.close()
    settings = cfg.eval
    rows = result_rows(settings.prompts, base.scores, lora.scores)
    header = (f"LoRA `{lora_dir}` vs base `{cfg.model.pretrained}`: {len(settings.prompts)} prompts x "
              f"{settings.images_per_prompt} images, each pair from the same noise (eval.seed {settings.seed}, "
              f"{cfg.sampling.num_steps} DDIM steps, guidance {cfg.sampling.guidance_scale:g})."
              + (f" grid.png shows the first {GRID_PROMPTS}." if len(settings.prompts) > GRID_PROMPTS else "")
              + (f" The LoRA acts at steps k = {gate} only, as trained (adapter_steps.json); the base model at the "
                 "others." if (gate := cfg.adapter_steps()) else ""))
    write_report(out, rows, comparison_grid(base.images, lora.images, settings.images_per_prompt), header)
    return rows
