"""Command-line interface: assemble the subcommands (``commands/``), configure logging, run one, map errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import sys

from instructedit.commands.analyze import add_analyze_parser
from instructedit.commands.calibrate import add_calibrate_parser
from instructedit.commands.config import add_config_parser
from instructedit.commands.data import add_data_parser
from instructedit.commands.edit import add_edit_parser
from instructedit.commands.evaluate import add_evaluate_parser
from instructedit.commands.experiment import add_experiment_parser
from instructedit.commands.instructions import add_instructions_parser
from instructedit.commands.memory import add_memory_parser
from instructedit.commands.quickstart import add_quickstart_parser
from instructedit.commands.serve import add_serve_parser
from instructedit.commands.train import add_train_parser

logger = logging.getLogger("instructedit")

# In the order ``instructedit --help`` lists them.
SUBCOMMANDS = (add_data_parser, add_train_parser, add_evaluate_parser, add_calibrate_parser, add_experiment_parser, add_memory_parser,
               add_analyze_parser, add_instructions_parser, add_edit_parser, add_quickstart_parser, add_serve_parser, add_config_parser)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructedit", description="Instruction-based knowledge editing of LLMs (InstructEdit / MEND).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for results that record how they were made
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError, FloatingPointError) as e:  # FloatingPointError: training diverged
        logger.error("%s", e)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; the last checkpoint (if any) is intact and a rerun resumes from it")
        return 130


if __name__ == "__main__":
    sys.exit(main())
