"""The `offsetkeeper` command line: one sub-command per module (`_cli_<command>.py`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import structlog

from consumer._version import __version__
from consumer.cli.audit import add_audit_parser
from consumer.cli.checkpoint import add_checkpoint_parser
from consumer.cli.dlq import add_dlq_parser
from consumer.cli.replay import add_replay_parser
from consumer.cli.run import add_run_parser
from consumer.core.errors import OffsetkeeperError
from consumer.core.exit_codes import EXIT_FAILED

log = structlog.get_logger("offsetkeeper.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offsetkeeper",
        description="Consume Kafka topics into sinks exactly once in effect.",
    )
    parser.add_argument("--version", action="version", version=f"offsetkeeper {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_run_parser(commands)
    add_checkpoint_parser(commands)
    add_replay_parser(commands)
    add_dlq_parser(commands)
    add_audit_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # What was asked for, as given: `run --workers N` starts its workers with it.
    args.command_line = tuple(sys.argv[1:] if argv is None else argv)
    try:
        exit_code: int = args.handler(args)
    except OffsetkeeperError as exc:
        log.error(  # noqa: TRY400 - expected failures get one clear line, not a traceback
            "offsetkeeper_failed", error_type=type(exc).__name__, error=str(exc)
        )
        print(f"offsetkeeper: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
