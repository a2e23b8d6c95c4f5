"""``tailorpo train | eval | make-tiny-model | train-tiny-shapes | serve-reward | build-style-pairs | sample-pairs``."""

from __future__ import annotations

import argparse
import sys
import warnings

from tailorpo.config import Config, ConfigError, ConfigWarning, load_config
from tailorpo.rewards.catalogue import REWARD_NAMES
from tailorpo.rewards.service import ServerConfig


def load_config_telling_warnings(path: str, overrides: list[str]) -> Config:
    """The config, with each config warning told as one ``warning: ...`` line on stderr, as errors are told."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        cfg = load_config(path, overrides)
    for warning in caught:
        if issubclass(warning.category, ConfigWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tailorpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="run the local trainer on a YAML config")
    train_p.add_argument("config", help="YAML config, e.g. launch/tiny.yaml")
    train_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a field, e.g. --set optim.lr=1e-4 (repeatable)")
    train_p.add_argument("--no-progress", action="store_true", help="no progress bar")
    train_p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    eval_p = sub.add_parser("eval", help="a trained LoRA against its base model on the eval prompts (same noise): "
                            "reward mean and std, win rate, a table and an image grid")
    eval_p.add_argument("config", help="the run's YAML config, e.g. OUTPUT_DIR/config.yaml")
    eval_p.add_argument("--lora", help="LoRA folder written by tailorpo train (default: OUTPUT_DIR/lora)")
    eval_p.add_argument("--out", help="report folder (default: OUTPUT_DIR/eval_report)")
    eval_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set eval.images_per_prompt=5 (repeatable)")
    tiny_p = sub.add_parser("make-tiny-model", help="write the tiny SD-shaped (or SDXL-shaped) pipeline to DIR, "
                            "or a full-size one with random weights")
    tiny_p.add_argument("dir")
    tiny_p.add_argument("--seed", type=int, default=0)
    tiny_p.add_argument("--sdxl", action="store_true", help="SDXL-shaped: two text encoders, pooled and size ids")
    tiny_p.add_argument("--full-size", choices=["sd15", "sdxl"], help="the published SD v1.5 or SDXL architecture "
                        "with random weights instead (4.3 / 14 GB in float32), to measure memory and speed at real "
                        "size")
    tiny_p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="dtype of the written weights (--full-size; float16 halves the folder)")
    shapes_p = sub.add_parser("train-tiny-shapes", help="train the tiny-shapes model and its classifier reward on "
                              "synthetic shapes (CPU, about 15 min) and write them to DIR")
    shapes_p.add_argument("dir", help="e.g. tailorpo/tiny/assets/tiny-shapes to regenerate the shipped model")
    shapes_p.add_argument("--seed", type=int, default=0)
    serve_p = sub.add_parser("serve-reward", help="serve a reward model over gRPC")
    serve_p.add_argument("name", help=", ".join(REWARD_NAMES))
    serve_p.add_argument("--host", default=ServerConfig.host, help="bind address (default loopback only)")
    serve_p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve_p.add_argument("--device", default="cpu")
    serve_p.add_argument("--weights", help="hub id or local path of the checkpoint (default: the published one)")
    serve_p.add_argument("--tiny", action="store_true", help="same architecture, small random weights (tests)")
    serve_p.add_argument("--component", action="append", default=[], metavar="PART=PATH",
                         help="hub id or local path of a further part, e.g. clip=/models/clip-vit-large-patch14 "
                         "for aesthetic (docs/rewards.md)")
    serve_p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                         help="dtype of the reward model's weights (scores stay float32)")
    serve_p.add_argument("--max-batch-size", type=int, default=ServerConfig.max_batch_size)
    serve_p.add_argument("--max-wait-ms", type=float, default=ServerConfig.max_wait_ms)
    serve_p.add_argument("--max-queue", type=int, default=ServerConfig.max_queue)
    serve_p.add_argument("--token-env", help="name of an environment variable holding the bearer token")
    serve_p.add_argument("--tls-cert")
    serve_p.add_argument("--tls-key")
    serve_p.add_argument("--tls-client-ca", help="mutual TLS: accept only clients whose certificate this CA signed")
    style_p = sub.add_parser("build-style-pairs", help="MaPO's Pick-Style / Pick-Safety: a pair folder sampled "
                             "from the config's base model with a preferred and a dispreferred prompt prefix")
    style_p.add_argument("config", help="YAML config: model, resolution, sampling steps and guidance, seed")
    style_p.add_argument("out", help="pair folder to append to (pairs.jsonl + images/)")
    style_p.add_argument("--prompts", nargs="+", metavar="PROMPT", help="prompts, or one text file with a prompt "
                         "per line (default: the config's prompts)")
    style_p.add_argument("--recipe", choices=["style", "safety"], default="style",
                         help="prefix defaults: style = Pick-Style, safety = Pick-Safety (plain prompt preferred)")
    style_p.add_argument("--preferred-prefix", help="prefix of the preferred image's prompt")
    style_p.add_argument("--dispreferred-prefix", help="prefix of the dispreferred image's prompt")
    style_p.add_argument("--images-per-prompt", type=int, default=1)
    style_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sample_p = sub.add_parser("sample-pairs", help="a pair folder of the config's base model's own samples, two "
                              "per prompt ranked by the config's reward (ties skipped)")
    sample_p.add_argument("config", help="YAML config: model, sampling, reward, prompts, seed")
    sample_p.add_argument("out", help="pair folder to append to (pairs.jsonl + images/)")
    sample_p.add_argument("--count", type=int, required=True, help="pairs to write (at least; whole batches)")
    sample_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    commands = {"train": train, "eval": evaluate_lora, "make-tiny-model": make_tiny_model,
                "train-tiny-shapes": train_tiny_shapes, "serve-reward": serve_reward,
                "build-style-pairs": build_style_pairs, "sample-pairs": sample_pairs}
    try:
        return commands[args.command](args)
    except ConfigError as err:  # first: a bad config must not import the model libraries below
        print(f"error: {err}", file=sys.stderr)
        return 2
    except user_errors() as err:  # evaluated only when something else is raised: the imports stay lazy
        print(f"error: {err}", file=sys.stderr)
        return 2


def user_errors() -> tuple[type[Exception], ...]:
    """Errors in what the user gave (data, LoRA, reward servers): one line and exit code 2, no traceback."""
    from tailorpo.diffusion.lora import LoraLoadError
    from tailorpo.pairs.data import PairDataError
    from tailorpo.rewards.grpc_client import RewardServerError

    return LoraLoadError, PairDataError, RewardServerError


def make_tiny_model(args: argparse.Namespace) -> int:
    from tailorpo.tiny.models import make_tiny_model as make

    if args.full_size and args.sdxl:
        print("error: --sdxl is the tiny SDXL-shaped model; for the full-size one give --full-size sdxl alone",
              file=sys.stderr)
        return 2
    if not args.full_size and args.dtype != "float32":
        print("error: --dtype applies to --full-size models only (the tiny ones are written in float32)",
              file=sys.stderr)
        return 2
    if args.full_size:
        import torch

        from tailorpo.tiny.full_size import make_full_size_model

        print(f"wrote {make_full_size_model(args.dir, args.full_size, args.seed, getattr(torch, args.dtype))}")
        return 0
    print(f"wrote {make(args.dir, args.seed, sdxl=args.sdxl)}")
    return 0


def train_tiny_shapes(args: argparse.Namespace) -> int:
    from tailorpo.tiny.shapes_training import train_tiny_shapes as train_shapes

    train_shapes(args.dir, args.seed)
    return 0


def train(args: argparse.Namespace) -> int:
    cfg = load_config_telling_warnings(args.config, args.overrides)
    from tailorpo.rewards import RewardInputError
    from tailorpo.training.loop import train as run  # heavy imports only once the config is known to be good

    if cfg.reads_offline_pairs:
        from tailorpo.training.pair_loop import train_pairs as run
    elif cfg.runtime.samplers:
        from tailorpo.runtime.driver import train_on_ray as run
    try:
        print(run(cfg, progress=not args.no_progress, resume=args.resume).text())
    except (FloatingPointError, RewardInputError) as err:  # NaN/inf in a loss, the latents or the rewards
        cause = " (the policy's samples: a diverged LoRA? lower optim.lr)" if isinstance(err, RewardInputError) else ""
        print(f"error: training stopped: {err}{cause}\nnothing was trained on it; the newest checkpoint in "
              f"{cfg.output_dir} (train.checkpoint_every) precedes it: fix the cause and rerun with --resume "
              "(or afresh, if the LoRA itself diverged)", file=sys.stderr)
        return 1
    return 0


def build_style_pairs(args: argparse.Namespace) -> int:
    from pathlib import Path

    cfg = load_config_telling_warnings(args.config, args.overrides)
    from tailorpo.training.pair_builders import RECIPES  # heavy: only with a good config
    from tailorpo.training.pair_builders import build_style_pairs as build

    preferred, dispreferred = RECIPES[args.recipe]
    preferred = preferred if args.preferred_prefix is None else args.preferred_prefix
    dispreferred = dispreferred if args.dispreferred_prefix is None else args.dispreferred_prefix
    if dispreferred is None:
        print(f"error: --recipe {args.recipe} needs --dispreferred-prefix (no default is shipped)", file=sys.stderr)
        return 2
    prompts = args.prompts or cfg.prompts
    if len(prompts) == 1 and Path(prompts[0]).is_file():
        prompts = [line.strip() for line in Path(prompts[0]).read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        written = build(cfg, args.out, prompts, preferred, dispreferred, args.images_per_prompt)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written} pairs to {args.out} (preferred: {preferred!r}, dispreferred: {dispreferred!r})")
    return 0


def sample_pairs(args: argparse.Namespace) -> int:
    cfg = load_config_telling_warnings(args.config, args.overrides)
    from tailorpo.training.pair_builders import build_reward_pairs

    try:
        written, ties = build_reward_pairs(cfg, args.out, args.count)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ranked_by = "the reward servers" if cfg.reward.servers else cfg.reward.name
    print(f"wrote {written} pairs to {args.out} ranked by {ranked_by} ({ties} ties skipped)")
    return 0


def serve_reward(args: argparse.Namespace) -> int:
    import torch

    from tailorpo.rewards.catalogue import SERVER, build_reward, resolve, reward_entry
    from tailorpo.rewards.service import token_from_env

    try:
        config = ServerConfig(
            host=args.host, port=args.port, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue, token=token_from_env(args.token_env, "--token-env"), tls_cert=args.tls_cert,
            tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        )
        score_notes = reward_entry(args.name, "serve-reward NAME").score_notes
        serve_forever = resolve(SERVER, "serve-reward")
        components = dict(part.split("=", 1) for part in args.component if "=" in part)
        if len(components) != len(args.component):
            raise ValueError(f"--component: {args.component} must each be PART=PATH, e.g. clip=/models/clip-l")
        model = build_reward(args.name, args.weights, tiny=args.tiny, device=args.device, field="serve-reward NAME",
                             dtype=getattr(torch, args.dtype), components=components, components_field="--component")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.tls_cert:
        print(f"warning: --host {args.host} is reachable from other machines and TLS is off: images, scores "
              "and the token travel in plaintext; give --tls-cert and --tls-key", file=sys.stderr)
    serve_forever(model, config, score_notes)
    return 0


def evaluate_lora(args: argparse.Namespace) -> int:
    from pathlib import Path

    cfg = load_config_telling_warnings(args.config, args.overrides)
    lora = Path(args.lora or Path(cfg.output_dir) / "lora")
    if not args.lora and not lora.exists():
        print(f"error: no LoRA at {lora} (the config's output_dir/lora); train first, or give --lora DIR",
              file=sys.stderr)
        return 2
    out = Path(args.out or Path(cfg.output_dir) / "eval_report")
    from tailorpo.training.evaluation import REPORT_FILES, markdown_table, run_eval  # heavy: only with a good config

    rows = run_eval(cfg, lora, out)
    print(f"{markdown_table(rows)}\nwrote {', '.join(REPORT_FILES)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
