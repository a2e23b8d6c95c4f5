"""``tailorpo train | make-tiny-model | serve-reward``."""

from __future__ import annotations

import argparse
import sys

from tailorpo.config import ConfigError, load_config


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
    args = parser.parse_args(argv)

    if args.command == "make-tiny-model":
        from tailorpo.models import make_tiny_model

        print(f"wrote {make_tiny_model(args.dir, args.seed, sdxl=args.sdxl)}")
        return 0
    if args.command == "serve-reward":
        return serve_reward(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tailorpo.rewards.grpc_client import RewardServerError
    from tailorpo.trainer import train  # heavy imports only once the config is known to be good

    if cfg.runtime.samplers:
        from tailorpo.runtime.driver import train_on_ray as train
    try:
        print(train(cfg, progress=not args.no_progress, resume=args.resume).text())
    except (ConfigError, RewardServerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
    config = ServerConfig(
        host=args.host, port=args.port, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
    )
    serve_forever(model, config, SCORE_NOTES.get(args.name, ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
