"""``tailorpo train | make-tiny-model | serve-reward | build-style-pairs``."""

from __future__ import annotations

import argparse
import sys

from tailorpo.config import PAIR_ALGORITHMS, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tailorpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="run the local trainer on a YAML config")
    train_p.add_argument("config", help="YAML config, e.g. launch/tiny.yaml")
    train_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a field, e.g. --set optim.lr=1e-4 (repeatable)")
    train_p.add_argument("--no-progress", action="store_true", help="no progress bar")
    train_p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    tiny_p = sub.add_parser("make-tiny-model", help="write the tiny SD-shaped (or SDXL-shaped) pipeline to DIR")
    tiny_p.add_argument("dir")
    tiny_p.add_argument("--seed", type=int, default=0)
    tiny_p.add_argument("--sdxl", action="store_true", help="SDXL-shaped: two text encoders, pooled and size ids")
    serve_p = sub.add_parser("serve-reward", help="serve a reward model over gRPC")
    serve_p.add_argument("name", help="aesthetic, imagereward, pickscore, hpsv2, jpeg or colorfulness")
    serve_p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve_p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve_p.add_argument("--device", default="cpu")
    serve_p.add_argument("--weights", help="hub id or local path of the checkpoint (default: the published one)")
    serve_p.add_argument("--tiny", action="store_true", help="same architecture, small random weights (tests)")
    serve_p.add_argument("--max-batch-size", type=int, default=16)
    serve_p.add_argument("--max-wait-ms", type=float, default=5.0)
    serve_p.add_argument("--max-queue", type=int, default=64)
    serve_p.add_argument("--token-env", help="name of an environment variable holding the bearer token")
    serve_p.add_argument("--tls-cert")
    serve_p.add_argument("--tls-key")
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
    args = parser.parse_args(argv)

    if args.command == "make-tiny-model":
        from tailorpo.models import make_tiny_model

        print(f"wrote {make_tiny_model(args.dir, args.seed, sdxl=args.sdxl)}")
        return 0
    if args.command == "serve-reward":
        return serve_reward(args)
    if args.command == "build-style-pairs":
        return build_style_pairs(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tailorpo.pair_data import PairDataError
    from tailorpo.rewards.grpc_client import RewardServerError
    from tailorpo.trainer import train  # heavy imports only once the config is known to be good

    if cfg.algorithm.name in PAIR_ALGORITHMS:
        from tailorpo.pair_trainer import train_pairs as train
    elif cfg.runtime.samplers:
        from tailorpo.runtime.driver import train_on_ray as train
    try:
        print(train(cfg, progress=not args.no_progress, resume=args.resume).text())
    except (ConfigError, RewardServerError, PairDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def build_style_pairs(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tailorpo.style_pairs import RECIPES, build_style_pairs as build  # heavy: only with a good config

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


def serve_reward(args: argparse.Namespace) -> int:
    import os

    from reward_servers import SCORE_NOTES, load_reward_model
    from reward_servers.server import ServerConfig, serve_forever

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            print(f"error: --token-env {args.token_env}: that environment variable is empty or unset",
                  file=sys.stderr)
            return 2
    try:
        model = load_reward_model(args.name, args.weights, tiny=args.tiny, device=args.device)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.tls_cert:
        print(f"warning: --host {args.host} is reachable from other machines and TLS is off: images, scores "
              "and the token travel in plaintext; give --tls-cert and --tls-key", file=sys.stderr)
    config = ServerConfig(
        host=args.host, port=args.port, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
    )
    serve_forever(model, config, SCORE_NOTES.get(args.name, ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
