"""The TailorPO paper's evidence, regenerated with this framework's own sampler, trainer and eval:

- Fig. 4, reward vs samples (``curves``): every method trained per seed on the same sample budget, the
  fixed-noise eval reward read back from each run's TensorBoard log (steps are sample counts), mean and std
  across seeds.
- Fig. 2, order inconsistency (``inconsistency``): for pairs of independent base-model trajectories, how often
  the order of the step-wise rewards r(c, decode(x0_hat(x_{t-1}))) at a fine-tuned step disagrees with the
  order of the final rewards. Optionally, for two branches of ONE x_t, the x0_hat order against the order of
  each branch's expected final reward (the mean over K - 1 continuations), next to what one continuation's
  final reward (D3PO's ranking signal) gets: the paper's claim is that the step-wise reward estimates the
  expected one.
- Table 1, guidance (``guidance``): over noisy base-model samples x_{t-1}, the share with r_t(x^+) > r_t(x)
  and with r_t(x^-) < r_t(x) (Eq. 14, fixed eta_t and delta).
- Table 3, prompt generalization (``generalization``): each trained LoRA on held-out prompts, five images per
  prompt, the mean reward per method (mean and std across seeds) and its win rate over the base model on the
  same noise.
- Beyond the paper, where a LoRA acts (``lora_steps``): each trained LoRA switched on only at the fine-tuned
  steps, only at the other steps, or at all steps, every chain on the same noise, against the base model. A
  method trained on 5 of 20 steps still changes the other 15.

``experiments/paper_claims.py`` is the command line (``cli``). The math (disagreement, success rates, seed
bands) is in the small pure functions of ``stats``; everything else runs the package's own pieces: the step-wise
reward is the sampler's ``step_reward_fn`` and every chain is ``tailorpo.algorithms.rollouts.denoise``.
"""
