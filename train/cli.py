"""Command line: ``python -m train --config FILE [--override key=value ...] [--check]``.

Config errors exit 2 with one line on stderr, before torch is imported (so in well under 2 s)
and before any process group starts; hardware checks follow, still before the group starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from train import startup
from train.config import ConfigError, known_keys, load_config
from train.outputs import check_output_dir, say
from train.signals import StopSignals

EXIT_CONFIG = 2


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        say(f"train: error: {message} (see python -m train --help)", sys.stderr)
        raise SystemExit(EXIT_CONFIG)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m train",
        description="Distributed GEMM training loop measuring compute/communication overlap. "
        "Run one process per GPU under torchrun (gloo on CPU).",
        epilog="config keys: " + ", ".join(known_keys()),
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML config file")
    parser.add_argument(
        "--override",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="section.key=value (YAML scalar); repeatable, several pairs each, applied in order",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and output directory, then exit (no torch import)",
    )
    return parser


def _fail(message: str) -> int:
    say(f"train: error: {message}", sys.stderr)
    return EXIT_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.override)
        check_output_dir(config.training.output_dir, config.source)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.check:
        say(f"train: {config.source}: config OK")
        return 0

    # Signals are caught from here on, so a stop during the slow imports below still ends
    # with a summary instead of a traceback.
    signals = StopSignals()
    signals.install()
    startup.mark("cli")

    from train.runtime import plan_runtime

    startup.mark("torch_imported")

    try:
        plan = plan_runtime(config)
    except ConfigError as exc:
        return _fail(str(exc))

    if config.pool.channels:
        from train.pool import run_pool

        try:
            return run_pool(config, plan, signals)
        except ConfigError as exc:
            return _fail(str(exc))

    from train.trainer import Trainer

    return Trainer(config, plan, signals).run()
