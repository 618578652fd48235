"""The `ephemera` command: `operator`, `webhook`, and more subcommands as they come."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from ephemera import logs
from ephemera.config import Settings, get_settings


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as err:
        problems = "; ".join(f"EPHEMERA_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in err.errors())
        raise SystemExit(f"invalid settings: {problems}") from err


def run_operator(args: argparse.Namespace) -> int:
    import kopf  # imported here: the webhook process never loads the operator

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format)
    import ephemera.operator  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=True,
        standalone=settings.peering is None,
        peering_name=settings.peering,
    )
    return 0


def run_webhook(args: argparse.Namespace) -> int:
    from ephemera.webhook import app

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format)
    app.run(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ephemera", description="Preview environments for GitHub pull requests.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("operator", help="run the kopf operator").set_defaults(func=run_operator)
    commands.add_parser("webhook", help="run the GitHub webhook receiver").set_defaults(func=run_webhook)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
