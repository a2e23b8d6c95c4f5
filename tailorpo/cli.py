"""``tailorpo train | make-tiny-model``."""

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
    tiny_p = sub.add_parser("make-tiny-model", help="write the tiny SD-shaped pipeline to DIR")
    tiny_p.add_argument("dir")
    tiny_p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "make-tiny-model":
        from tailorpo.models import make_tiny_model

        print(f"wrote {make_tiny_model(args.dir, args.seed)}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tailorpo.trainer import train  # heavy imports only once the config is known to be good

    print(train(cfg, progress=not args.no_progress).text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
