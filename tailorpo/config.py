"""One typed config tree, loaded from YAML with ``a.b=value`` overrides, validated before any model loads.

Defaults follow the TailorPO paper's setup (SD v1.5, DDIM eta=1, 20 steps, batch 2, 10,000 samples) except
where the LoRA trains and acts: the paper's steps 20,16,12,8,4 plus 3,2,1, with the LoRA on only there
(measured in docs/results.md; the paper's exact steps: launch/paper_sd15.yaml). Where the paper defers to
D3PO, D3PO's public ``config/base.py`` (yk7333/d3po): AdamW lr 3e-5, betas (0.9, 0.999), weight decay 1e-4,
eps 1e-8, DPO beta 0.1, ratio clip ``train.eps`` 0.1, max grad norm 1.0, guidance scale 5.0 in sampling and
training, LoRA rank 4. DDPO's own values come from ddpo-pytorch's ``config/base.py`` (clip range 1e-4,
advantage clip 5).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from tailorpo.prompts import SIMPLE_ANIMALS
from tailorpo.rewards.catalogue import REWARD_NAMES, check_components, reward_entry
from tailorpo.rewards.service import (
    BACKOFF_S,
    MAX_BACKOFF_S,
    RETRIES,
    TIMEOUT_S,
    ServerConfig,
    check_client_tls,
    check_server_tls,
    retry_window_s,
)


class ConfigError(ValueError):
    """A config that cannot run; the message names each offending field and how to fix it."""


class ConfigWarning(UserWarning):
    """A config that runs but probably not as meant; the message names the fields and the fixes."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    pretrained: str = Field(
        "runwayml/stable-diffusion-v1-5",
        description="Hub id, local diffusers folder, 'tiny-sd' (built-in random-weight SD-shaped model) or "
        "'tiny-shapes' (trained here on synthetic shapes, 32 px; shipped in the package).",
    )
    revision: str | None = None
    resolution: int = Field(512, gt=0, multiple_of=8, description="Image side in pixels.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the frozen base weights; LoRA weights always train in float32."
    )
    gradient_checkpointing: list[Literal["unet", "vae"]] = Field(
        [], description="Recompute these modules' activations in the backward pass instead of keeping them: "
        "'unet' (learner steps, guidance through the UNet), 'vae' (the decoder in TailorPO-G's guidance). The "
        "same gradients for about one more forward; the memory it saves: docs/benchmarks.md.",
    )
    vae_slicing: bool = Field(
        False, description="Decode a batch one image at a time (diffusers' enable_slicing): the same images with "
        "the decode's activation peak of one image (eval decodes eval.batch_size images at once otherwise).",
    )


class SamplingConfig(Section):
    num_steps: int = Field(20, ge=2, le=1000, description="DDIM inference steps T.")
    eta: float = Field(1.0, gt=0, le=1, description="DDIM eta; > 0 so the policy has a density.")
    guidance_scale: float = Field(5.0, ge=1, description="Classifier-free guidance, in sampling and training.")
    batch_size: int = Field(2, ge=1, description="Prompts per iteration (the paper uses 2).")
    logprob_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="'mean' over latent dims as D3PO's code (its beta and ratio clip assume it); 'sum' is Eq. 17.",
    )


class GuidanceConfig(Section):
    eta_min: float = Field(0.1, ge=0, description="eta_t at the noisiest fine-tuned step.")
    eta_max: float = Field(0.2, ge=0, description="eta_t at the fine-tuned step closest to the image.")
    delta: float = Field(0.5, gt=0, description="r_high = r + delta (Eq. 13).")
    through_unet: bool = Field(
        True, description="Differentiate x0_hat through the UNet (exact); False holds eps fixed (cheaper)."
    )
    units: Literal["reward", "sigma"] = Field(
        "reward", description="'reward': x^+ = x - eta_t grad (r_high - r)^2 (Eq. 14), a push that scales with the "
        "reward; 'sigma': a push of sigma_fraction * sigma_t per latent dim along grad r, whatever the reward's "
        "scale (eta_min, eta_max and delta unused)."
    )
    sigma_fraction: float = Field(
        0.5, gt=0, description="With units='sigma': the push's per-dimension RMS as a fraction of the step's DDIM "
        "std sigma_t (two sibling children lie about 1.4 sigma_t apart)."
    )
    chunk_size: int | None = Field(
        None, ge=1, description="Rows per guidance backward pass (the UNet at t-1, the VAE decoder and the reward); "
        "null: the whole batch. 1 (per prompt) divides the pass's memory peak by the batch size, same x^+."
    )


class BranchingConfig(Section):
    """TailorPO's branch pairs. Defaults are the paper's; children, min_reward_gap and continue_from='random' follow
    SPO (Liang et al., Step-aware Preference Optimization, arXiv 2406.04314); labels='random' is a control."""

    children: int = Field(
        2, ge=2, description="Children drawn from each x_t at a fine-tuned step; the pair is the best vs the worst "
        "by the step-wise reward (each extra child costs one more UNet call and decode per prompt)."
    )
    min_reward_gap: float = Field(
        0.0, ge=0, description="Pairs with |r_w - r_l| <= this are dropped from the loss, as ties are (0: only ties)."
    )
    continue_from: Literal["winner", "random"] = Field(
        "winner", description="The next step's x_t: the pair's winner (the paper) or a uniformly random child (SPO)."
    )
    labels: Literal["reward", "random", "continuations"] = Field(
        "reward", description="What ranks the children: 'reward' the step-wise reward r(x0_hat) (Eq. 12); 'random' "
        "a control, the winner a fair coin flip, all else equal; 'continuations' an upper bound, the mean final "
        "reward of `continuations` DDIM chains run on from each child (E[r(x_0) | x_{t-1}], estimated; costly)."
    )
    continuations: int = Field(
        4, ge=1, description="With labels='continuations': chains continued from each child to estimate its "
        "expected final reward (each costs one UNet call per remaining step and one decode)."
    )


class DDPOConfig(Section):
    clip_range: float = Field(1e-4, gt=0, description="Importance-ratio clip c.")
    adv_clip: float = Field(5.0, gt=0, description="Advantages clipped to [-adv_clip, adv_clip].")
    samples_per_prompt: int = Field(2, ge=1, description="Images of each prompt in one batch.")
    stat_buffer_size: int = Field(16, ge=1, description="Rewards kept per prompt for advantage statistics.")
    stat_min_count: int = Field(16, ge=1, description="Below this many, the batch's statistics are used.")


@dataclass(frozen=True)
class AlgorithmFacts:
    """What validating a config must know of an algorithm, before any model library loads. How each one samples
    and learns is ``tailorpo.algorithms.registry``, which builds its entries from these (a test pins both to the
    same names): adding an algorithm is one module, one registry entry and its facts here."""

    name: str
    images_per_row: int = 1  # images sampled per row of sampling.batch_size (two per prompt: a ranked pair)
    differentiable_reward: bool = False  # pushes the winner up the reward's gradient (TailorPO-G, Eq. 14)
    pair_objective: bool = False  # on pairs of final images: from pairs.source (one process) or its own samples
    batch_counts_images: bool = False  # sampling.batch_size counts images, algorithm.ddpo.samples_per_prompt a prompt


ALGORITHM_FACTS: dict[str, AlgorithmFacts] = {
    facts.name: facts
    for facts in (
        AlgorithmFacts("tailorpo"),
        AlgorithmFacts("tailorpo_g", differentiable_reward=True),
        AlgorithmFacts("d3po", images_per_row=2),
        AlgorithmFacts("ddpo", batch_counts_images=True),
        AlgorithmFacts("diffusion_dpo", images_per_row=2, pair_objective=True),
        AlgorithmFacts("mapo", images_per_row=2, pair_objective=True),
        AlgorithmFacts("diff_contrast", images_per_row=2, pair_objective=True),
    )
}
ALGORITHM_NAMES = tuple(ALGORITHM_FACTS)


PAPER_STEPS = (20, 16, 12, 8, 4)  # TailorPO's fine-tuned steps (arXiv 2502.01667, Sec. 5), with the LoRA at all 20
DEFAULT_STEPS = (*PAPER_STEPS, 3, 2, 1)  # chosen by docs/results.md "Which steps": the paper's plus the tail


class RandomSteps(Section):
    """``{random: m}``: m steps drawn per trajectory from the rollout's own generator, as ddpo-pytorch (Black et
    al., arXiv 2305.13301) trains a random ``timestep_fraction`` of each trajectory's steps."""

    random: int = Field(ge=1, description="Steps drawn per trajectory.")

    def __str__(self) -> str:
        return f"{{random: {self.random}}}"


def _selection_kind(value: Any) -> str | None:
    """Which form of a step selection ``value`` is, so a bad one gets one message instead of one per form."""
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict | RandomSteps):
        return "random"
    return "all" if value == "all" else None


StepSelection = Annotated[
    Annotated[list[int], Tag("list")] | Annotated[Literal["all"], Tag("all")] | Annotated[RandomSteps, Tag("random")],
    Discriminator(_selection_kind, custom_error_type="step_selection",
                  custom_error_message="give a list of steps k, 'all', or {random: m}"),
]


def steps_k(selection: StepSelection, num_steps: int) -> list[int]:
    """Every step k (descending) a selection may pick: its list, or all num_steps for 'all' and {random: m}."""
    if isinstance(selection, list):
        return sorted(selection, reverse=True)
    return list(range(num_steps, 0, -1))


def step_list_problems(field: str, steps: list[int], num_steps: int) -> list[str]:
    """What is wrong with an explicit list of steps k of a num_steps chain, naming ``field``."""
    problems = []
    bad = [k for k in steps if not 1 <= k <= num_steps]
    if len(set(steps)) != len(steps):
        problems.append(f"{field}: {steps} repeats a step; list each step once")
    if bad or not steps:
        problems.append(f"{field}: {bad or 'empty'} not in 1..sampling.num_steps={num_steps}; give steps k with "
                        "1 <= k <= num_steps")
    return problems


class AlgorithmConfig(Section):
    name: Literal[ALGORITHM_NAMES] = Field(
        "tailorpo", description="Step-wise or trajectory objectives: tailorpo, tailorpo_g, d3po, ddpo. On pairs "
        "of final images: diffusion_dpo, mapo, diff_contrast, from pairs.source (offline) or, without it, from "
        "the policy's own samples (two per prompt ranked by the reward)."
    )
    fine_tuned_steps: list[int] = Field(
        list(DEFAULT_STEPS),
        description="Steps k (x_k -> x_{k-1}, k = T..1) that branch and train, unless branch_steps or train_steps "
        "say otherwise: the paper's 20, 16, 12, 8, 4 plus the low-noise tail 3, 2, 1, where x0_hat is nearly the "
        "image (so the step-wise ranking is nearly exact) and a LoRA left untrained moves the mean by several "
        "sigma (docs/results.md; the paper's own steps: launch/paper_sd15.yaml). D3PO and DDPO train on the same "
        "steps for like-for-like comparisons (D3PO's own code trains all T: list them all to match it).",
    )
    branch_steps: StepSelection | None = Field(
        None, description="Where the sampler branches (TailorPO) or records transitions (D3PO, DDPO): a list of "
        "steps k, 'all', or {random: m} drawn per trajectory; null: fine_tuned_steps."
    )
    train_steps: StepSelection | None = Field(
        None, description="Where the learner trains, a subset of the branch steps: a list of steps k, 'all', or "
        "{random: m} of each trajectory's branch steps; null: every branch step."
    )
    beta: float = Field(0.1, gt=0, description="DPO temperature.")
    ratio_clip: float | None = Field(
        0.1, gt=0, lt=1, description="Clamp pi/pi_ref to [1-c, 1+c] as D3PO does; null disables."
    )
    guidance: GuidanceConfig = GuidanceConfig()
    branching: BranchingConfig = BranchingConfig()
    ddpo: DDPOConfig = DDPOConfig()

    @property
    def facts(self) -> AlgorithmFacts:
        return ALGORITHM_FACTS[self.name]

    @property
    def branch_selection(self) -> tuple[str, StepSelection]:
        """(field, selection) of where the sampler branches: branch_steps, else fine_tuned_steps."""
        if self.branch_steps is None:
            return "algorithm.fine_tuned_steps", self.fine_tuned_steps
        return "algorithm.branch_steps", self.branch_steps

    @property
    def train_selection(self) -> tuple[str, StepSelection]:
        """(field, selection) of where the learner trains: train_steps, else the branch steps."""
        if self.train_steps is None:
            return self.branch_selection
        return "algorithm.train_steps", self.train_steps

    def train_outside_branch(self, num_steps: int) -> str | None:
        """Why train_steps are not within the branch steps (the learner trains only on transitions the sampler
        made), or None."""
        if self.train_steps is None:
            return None
        branch_field, branch = self.branch_selection
        available = branch.random if isinstance(branch, RandomSteps) else len(steps_k(branch, num_steps))
        if isinstance(self.train_steps, RandomSteps):
            if self.train_steps.random > available:
                return (f"algorithm.train_steps: {self.train_steps} draws more steps per trajectory than "
                        f"{branch_field} gives ({available}); draw at most {available}")
            return None
        if isinstance(branch, RandomSteps):
            return (f"algorithm.train_steps: fixed steps need fixed branch steps, and {branch_field} is {branch}; "
                    f"use train_steps {{random: m}} with m <= {branch.random}, or null")
        missing = sorted(set(steps_k(self.train_steps, num_steps)) - set(steps_k(branch, num_steps)), reverse=True)
        if missing:
            return (f"algorithm.train_steps: steps {missing} are not branch steps ({branch_field}="
                    f"{steps_k(branch, num_steps)}); the learner trains only on transitions the sampler made: add "
                    f"them to {branch_field} or drop them from algorithm.train_steps")
        return None


class LoraSettings(Section):
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    active_steps: Literal["all", "trained"] | list[int] = Field(
        "trained", description="Steps k where the LoRA acts, in sampling, evaluation and `tailorpo eval`: 'trained' "
        "(the steps the learner trains; the base model at the others, so no step runs weights fitted elsewhere), "
        "'all' (what diffusers' load_lora_weights gives; the paper's setting), or a list of steps k that includes "
        "the trained ones. The gate is saved next to the LoRA file (lora/adapter_steps.json)."
    )


class OptimConfig(Section):
    lr: float = Field(3e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Rollouts whose losses are averaged into one optimizer step."
    )
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="bf16 autocast of the UNet and the VAE decoder (GPU)."
    )


class ActorResources(Section):
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    resources: dict[str, float] = Field({}, description="Custom Ray resources, e.g. {sampler_node: 1}.")


class RewardServerConfig(Section):
    addresses: list[str] = Field(min_length=1, description="host:port of servers of one reward; load is spread.")
    weight: float = Field(1.0, description="Weight of this reward in the sum of all configured servers.")


class LaunchedRewardServer(Section):
    name: str = Field(description=f"Servable reward: {', '.join(REWARD_NAMES)}.")
    weights: str | None = Field(None, description="Hub id or path of the checkpoint (default: the published one).")
    tiny: bool = Field(False, description="Tiny random weights of the same architecture (tests).")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the reward model's weights (bfloat16 halves them; scores stay float32)."
    )
    components: dict[str, str] = Field(
        {}, description="Hub id or local path of each further part the reward loads, e.g. {clip: /models/clip-l} "
        "for aesthetic (docs/rewards.md lists each reward's parts)."
    )
    weight: float = Field(1.0, description="Weight in the sum of all rewards.")
    host: str = Field(ServerConfig.host, description="Bind address; samplers on other nodes need a reachable one.")
    resources: ActorResources = Field(ActorResources(), description="Where the server's owner actor is placed.")
    tls_cert: str | None = Field(None, description="Server certificate (PEM) on the server's node; with tls_key.")
    tls_key: str | None = Field(None, description="Its private key (PEM). Clients verify it with reward.tls_ca.")
    tls_client_ca: str | None = Field(
        None, description="Mutual TLS: CA (PEM, on the server's node) that must have signed each client's "
        "certificate (reward.tls_client_cert); needs tls_cert."
    )

    @model_validator(mode="after")
    def _servable(self) -> LaunchedRewardServer:
        """At load, not when the Ray job starts the server."""
        reward_entry(self.name, "name")
        check_components(self.name, self.components, "components")
        check_server_tls(self.tls_cert, self.tls_key, self.tls_client_ca)
        return self


class RewardConfig(Section):
    name: str = Field(
        "jpeg", description="In-process reward, used without servers: 'jpeg', 'colorfulness', or a learned one with "
        "its default weights ('shapes', 'aesthetic', ...)."
    )
    servers: list[RewardServerConfig] = Field(
        [], description="gRPC reward servers (`tailorpo serve-reward`); several are summed with their weights."
    )
    launch: list[LaunchedRewardServer] = Field(
        [], description="Reward servers the Ray job starts as actors (runtime.samplers > 0), added to servers."
    )
    timeout_s: float = Field(TIMEOUT_S, gt=0, description="Deadline of one Score call.")
    retries: int = Field(
        RETRIES, ge=0, description=f"Retries on UNAVAILABLE / busy, each to the next address, backing off "
        f"{BACKOFF_S:g} s doubling to {MAX_BACKOFF_S:g} s ({RETRIES}: ~{retry_window_s():.0f} s, time for a launched "
        "server to restart)."
    )
    token_env: str | None = Field(None, description="Environment variable holding the servers' bearer token.")
    tls_ca: str | None = Field(None, description="CA certificate (PEM) to verify TLS servers; null: plaintext.")
    tls_client_cert: str | None = Field(
        None, description="Client certificate (PEM) for servers that require one (mutual TLS); needs tls_ca."
    )
    tls_client_key: str | None = Field(None, description="The client certificate's private key (PEM).")

    @model_validator(mode="after")
    def _client_tls(self) -> RewardConfig:
        """Fails at load what would otherwise fail at the first connection, after the models loaded."""
        check_client_tls(self.tls_ca, self.tls_client_cert, self.tls_client_key)
        if any(s.tls_client_ca for s in self.launch) and not self.tls_client_cert:
            raise ValueError("launch: a server with tls_client_ca accepts only clients with a certificate; "
                             "set reward.tls_client_cert and tls_client_key")
        return self


class EvalConfig(Section):
    """The fixed-noise evaluation of the end of a run, of ``eval.every`` and of ``tailorpo eval``."""

    prompts: list[str] = Field(["a cat", "a dog", "a horse", "a bird"], min_length=1)
    images_per_prompt: int = Field(5, ge=1, description="Images of each prompt (5: the paper's protocol).")
    seed: int = Field(1234, description="Batch j of images draws its noise from seed + j.")
    batch_size: int = Field(
        8, ge=1, description="Images sampled and scored at a time; base and LoRA share the noise of each batch."
    )
    every: int = Field(
        0, ge=0, description="Also every N optimizer updates (train.checkpoint_every's unit): eval reward to "
        "TensorBoard and an image grid in output_dir/eval (0: only base vs trained at the end)."
    )


class LogConfig(Section):
    wandb: bool = Field(False, description="Mirror scalars and grids to Weights & Biases (pip install wandb).")
    wandb_project: str = "tailorpo"
    reward_gradient_cosine: bool = Field(
        False, description="Per fine-tuned step, log the cosine between the LoRA's shift of the DDIM mean and the "
        "step reward's gradient (TailorPO, TailorPO-G, D3PO; skipped for a reward without gradients). Costs a UNet "
        "forward and backward and a decode backward per step and rollout."
    )


class TrainConfig(Section):
    total_samples: int = Field(10_000, ge=1, description="Trajectories sampled in the whole run.")
    save_every: int = Field(
        0, ge=0, description="Save the LoRA to output_dir/lora every N iterations, in one process and on Ray alike "
        "(an iteration: a rollout from each sampler, or a batch of pairs.source pairs; 0: only at the end)."
    )
    checkpoint_every: int = Field(
        0, ge=0, description="Write a resumable checkpoint every N optimizer updates (an update: "
        "optim.gradient_accumulation_steps rollouts or pair batches; on Ray an iteration trains on one rollout per "
        "sampler; 0: never)."
    )


class RuntimeConfig(Section):
    samplers: int = Field(
        0, ge=0, description="Ray sampler actors, one per GPU; 0 runs everything in this process (no Ray)."
    )
    address: str | None = Field(
        None, description="Ray cluster address; null: the job's cluster under `ray job submit`, else a local Ray."
    )
    sampler: ActorResources = ActorResources()
    learner: ActorResources = ActorResources()
    max_restarts: int = Field(
        3, ge=0, description="Restarts of a dying sampler or reward-server actor; also of the learner, which "
        "restarts from its newest checkpoint (train.checkpoint_every)."
    )
    pipeline: bool = Field(
        False, description="Samplers draw the next batch while the learner trains, with the LoRA one update "
        "old: less sampler idle time, slightly off-policy data (default: on-policy, samplers wait)."
    )


class MapoConfig(Section):
    beta_mapo: float = Field(0.1, gt=0, description="Weight of the margin term (mapo-t2i/mapo args.py default 0.1).")
    snr_value: float = Field(0.5, gt=0, description="s in g(e) = s e / (exp(s e) - 1) (public default 0.5).")


class DiffContrastConfig(Section):
    tau: float = Field(
        0.01, gt=0, description="Temperature of the in-batch weights W: 0.01 for human-preference alignment on "
        "SD1.5 (Diff-contrast Table 1; Diffusion-RPO, arXiv 2406.06382); 0.5-5 for style alignment."
    )
    clip_model: str = Field(
        "openai/clip-vit-large-patch14",
        description="transformers CLIPModel for f(y, x): hub id or local folder holding its tokenizer too.",
    )
    embedding_cache: str | None = Field(
        None, description="Folder of safetensors shards with each pair's CLIP embeddings, keyed by source row, "
        "so each pair is embedded once; null: output_dir/clip_embeddings."
    )


class PairsConfig(Section):
    """The pair objectives' data and hyper-parameters. With a source, train.total_samples counts pairs trained on
    (the data position a checkpoint stores) and reward is only the evaluation reward; without one, the pairs are
    the policy's own samples (sampling.batch_size prompts, two images each, ranked by reward, ties dropped) and
    train.total_samples counts images as for the other objectives."""

    source: str | None = Field(
        None, description="null: pairs of the policy's own samples (online, runs on Ray too). Else a pair "
        "folder (pairs.jsonl), Pick-a-Pic-style .parquet file or folder of shards, or a "
        "datasets hub id such as yuvalkirstain/pickapic_v2. Read again from the start after each pass."
    )
    split: str = Field("train", description="Split of a hub dataset.")
    streaming: bool = Field(False, description="Stream a hub dataset (Pick-a-Pic v2 is hundreds of GB).")
    on_error: Literal["skip", "raise"] = Field(
        "skip", description="A bad row (undecodable image, missing field): skip and count it, or stop the run."
    )
    batch_size: int = Field(
        4, ge=1, description="Pairs per learner step with pairs.source; Diff-contrast's in-batch M (online: "
        "sampling.batch_size prompts give up to that many pairs)."
    )
    beta: float = Field(
        2000.0, gt=0, description="Diffusion-DPO and Diff-contrast temperature. Default 2000, the papers' SD1.5 "
        "value; use 5000 for SDXL."
    )
    mapo: MapoConfig = MapoConfig()
    diff_contrast: DiffContrastConfig = DiffContrastConfig()


class Config(Section):
    seed: int = 0
    device: str = Field("auto", description="'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', ...")
    output_dir: str = "outputs/run"
    model: ModelConfig = ModelConfig()
    sampling: SamplingConfig = SamplingConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    lora: LoraSettings = LoraSettings()
    optim: OptimConfig = OptimConfig()
    reward: RewardConfig = RewardConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    log: LogConfig = LogConfig()
    pairs: PairsConfig = PairsConfig()
    prompts: list[str] = Field(SIMPLE_ANIMALS, min_length=1, description="Training prompts, drawn uniformly.")

    @property
    def reads_offline_pairs(self) -> bool:
        """A pair objective with pairs.source: it reads its pairs in one process (``training.pair_loop``)."""
        return self.algorithm.facts.pair_objective and bool(self.pairs.source)

    def trained_steps(self) -> list[int]:
        """Every step k (descending) some trajectory may train on: all of them for the pair objectives, which
        train at random noise levels."""
        num_steps = self.sampling.num_steps
        if self.algorithm.facts.pair_objective:
            return steps_k("all", num_steps)
        _, selection = self.algorithm.train_selection
        if isinstance(selection, RandomSteps):  # m of each trajectory's branch steps: any branch step
            _, selection = self.algorithm.branch_selection
        return steps_k(selection, num_steps)

    def adapter_steps(self) -> list[int] | None:
        """The steps k (descending) where the LoRA acts (lora.active_steps); None: every step."""
        active = self.lora.active_steps
        if active == "all":
            return None
        steps = self.trained_steps() if active == "trained" else sorted(active, reverse=True)
        return None if len(steps) == self.sampling.num_steps else steps

    def untrained_adapter_steps(self) -> list[int]:
        """Steps k where the LoRA acts although the learner never trains there: it moves the chain at those steps
        with weights fitted at others."""
        active = self.adapter_steps() or steps_k("all", self.sampling.num_steps)
        trained = set(self.trained_steps())
        return [k for k in active if k not in trained]

    def step_problems(self) -> list[str]:
        """The step selections' own checks, train within branch, and a gate that covers the trained steps."""
        num_steps, algo = self.sampling.num_steps, self.algorithm
        problems = step_list_problems("algorithm.fine_tuned_steps", algo.fine_tuned_steps, num_steps)
        selections = {"algorithm.branch_steps": algo.branch_steps, "algorithm.train_steps": algo.train_steps,
                      "lora.active_steps": self.lora.active_steps}
        for field, selection in selections.items():
            if isinstance(selection, list):
                problems += step_list_problems(field, selection, num_steps)
            elif isinstance(selection, RandomSteps) and selection.random > num_steps:
                problems.append(f"{field}: {selection} draws more than sampling.num_steps={num_steps} steps; give "
                                f"m <= {num_steps}")
        if problems:  # the checks below assume valid lists
            return problems
        if outside := algo.train_outside_branch(num_steps):
            problems.append(outside)
        if isinstance(self.lora.active_steps, list):
            ungated = sorted(set(self.trained_steps()) - set(self.lora.active_steps), reverse=True)
            if ungated:
                problems.append(f"lora.active_steps: misses the trained steps {ungated} ({algo.train_selection[0]}); "
                                "the learner can train the LoRA only where it acts: list them, or use 'trained'")
        return problems

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        problems = self.step_problems()
        if self.reward.launch and not self.runtime.samplers:
            problems.append("reward.launch: servers are started as Ray actors; set runtime.samplers > 0, or start "
                            "them with `tailorpo serve-reward` and list them in reward.servers")
        if not (self.reward.servers or self.reward.launch):  # a server's reward: known once it answers Info
            try:
                differentiable = reward_entry(self.reward.name).differentiable
            except ValueError as err:
                problems.append(str(err))
            else:
                if self.algorithm.facts.differentiable_reward and not differentiable:
                    problems.append(
                        f"algorithm.name: {self.algorithm.name!r} needs a differentiable reward, and reward.name="
                        f"{self.reward.name!r} is not; use algorithm.name=tailorpo or a differentiable reward"
                    )
        if self.algorithm.guidance.eta_min > self.algorithm.guidance.eta_max:
            problems.append("algorithm.guidance.eta_min: must not exceed eta_max")
        per_prompt = self.algorithm.ddpo.samples_per_prompt
        if self.algorithm.facts.batch_counts_images and self.sampling.batch_size % per_prompt:
            problems.append(
                "sampling.batch_size: must be a multiple of algorithm.ddpo.samples_per_prompt "
                f"({self.sampling.batch_size} vs {per_prompt})"
            )
        if self.reads_offline_pairs and self.runtime.samplers:
            problems.append(
                f"runtime.samplers: algorithm.name={self.algorithm.name!r} with pairs.source reads its pairs in one "
                "process (there is nothing to sample); set runtime.samplers=0 (under `ray job submit`, place the "
                "job with --entrypoint-num-gpus 1), or unset pairs.source to train on the samplers' own pairs"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown field; remove it or check its spelling")
        elif field == "(top level)":
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif isinstance(e.get("input"), dict):  # a section's own check: its message names the fields
            lines.append(f"  {field}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true/false. PyYAML follows YAML 1.1, where no/yes/on/off are booleans too, so
    ``mixed_precision: no`` would arrive as False and fail its string enum; bool fields still take them
    (pydantic reads 'no'/'yes'/'on'/'off' as booleans)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(text: str) -> Any:
    """YAML as configs are read (files and ``--set`` values alike): YAML 1.2 booleans."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value``; the value is read as YAML, so numbers, booleans, null and lists work."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
    key, raw = text.split("=", 1)
    return key.strip(), read_yaml(raw)


def untrained_steps_warning(cfg: Config) -> str | None:
    """The warning for a LoRA that acts at steps the learner never trains, naming them and the two fixes."""
    untrained = cfg.untrained_adapter_steps()
    if not untrained:
        return None
    field, selection = cfg.algorithm.train_selection
    return (f"lora.active_steps={cfg.lora.active_steps!r}: the LoRA acts at steps k = {untrained}, which are never "
            f"trained ({field}={selection}), with weights fitted at the other steps. Train them (list them in "
            "algorithm.fine_tuned_steps, or algorithm.branch_steps: all, optionally with algorithm.train_steps: "
            "{random: m}) or gate the adapter to the trained steps (lora.active_steps: trained).")


def build_config(tree: dict[str, Any], source: str = "") -> Config:
    """A validated config; warns (ConfigWarning) when it runs but probably not as meant."""
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    if message := untrained_steps_warning(cfg):
        warnings.warn(ConfigWarning(message), stacklevel=3)  # the caller of load_config
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = read_yaml(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, not {type(tree).__name__}")
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    return build_config(tree, f"{path}" if path else "(defaults)")


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
