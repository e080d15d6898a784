"""The commands' arguments and configs: repeated --cfg, key=value overrides, --output and --overwrite.

Configs merge in order: the defaults (configs/base.yaml), each --cfg file (later files win), then the
key=value overrides. Unknown keys are errors that name the key, in `trainer` too (checked against
the arguments of pytorch_lightning.Trainer). Only light modules are imported here at start-up, so
`--help` and a config mistake answer before torch, Lightning and diffusers load.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from omegaconf import DictConfig

from emerdiff.config import ConfigError, load_config
from ovseg.config import with_ovseg_defaults

from .messages import show_library_warnings
from .trainer import check_trainer_keys

# Library messages a user can do nothing about: Lightning's hardware lines and product tips (INFO), and a
# deprecation inside Lightning's own code.
QUIET_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")
QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
OVERRIDES_HELP = "config overrides applied after the files, e.g. segmentor.num_masks=10 trainer.devices=4"


def command_parser(description: str) -> argparse.ArgumentParser:
    """A parser for one of the commands, with --version (the library's version)."""
    from emerdiff import __version__

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s (emerdiff {__version__})")
    return parser


def base_parser(description: str, overrides_help: str = OVERRIDES_HELP) -> argparse.ArgumentParser:
    """A parser with the options every tool shares: --version, --cfg (repeatable) and key=value overrides."""
    parser = command_parser(description)
    parser.add_argument(
        "--cfg",
        action="append",
        default=[],
        metavar="YAML",
        help="config file, or a shipped config by name (tiny, emerdiff_sd15, eval/voc, ov/ade150, "
        "...); give it several times, later files override earlier ones",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, allowing key=value overrides before, between and after the options; then quiet the libraries, and show
    emerdiff's and ovseg's warnings beside the progress bar."""
    args = parser.parse_intermixed_args(argv)
    quiet_libraries()
    show_library_warnings()
    return args


def quiet_libraries() -> None:
    """Hide the libraries' messages that ask nothing of the user (QUIET_LOGGERS, QUIET_WARNINGS); warnings stay."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def add_output_arguments(parser: argparse.ArgumentParser, overwrite_help: str) -> None:
    """--output DIR (output.dir) and --overwrite (output.overwrite=true), shared by the tools that write results."""
    parser.add_argument("--output", help="results folder (output.dir)")
    parser.add_argument("--overwrite", action="store_true", help=f"{overwrite_help} (output.overwrite=true)")


def apply_output_arguments(cfg: DictConfig, args: argparse.Namespace) -> None:
    """Let --output and --overwrite win over the config files; the folder must be one this run can write."""
    cfg.output.dir = args.output or cfg.output.dir
    cfg.output.overwrite = args.overwrite or cfg.output.overwrite
    check_output_folder(Path(cfg.output.dir))


def check_output_folder(folder: Path) -> None:
    """A ConfigError, before anything loads, unless `folder` is a writable folder or can be made one."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output {folder}: {existing} is a file, not a folder; choose another output folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the output folder" if existing == folder else f"{existing}, where the output folder would be made,"
        raise ConfigError(f"--output {folder}: {what} is not writable by this user; choose a writable folder")


@contextmanager
def output_lock(folder: Path, holder: bool) -> Iterator[None]:
    """For the block, the output folder belongs to this run (`holder`: its global rank 0; the other ranks are the
    same run): a second run into it waits, saying for which process, and then finds the first run's work done.
    Ctrl-C while waiting gives up with status 130."""
    from emerdiff.files import folder_lock
    from emerdiff.stopping import EXIT_INTERRUPTED

    def waiting(other: str) -> None:
        print(
            f"waiting: another run is writing to {folder} ({other}); this run goes on when it ends "
            "and skips what it did (Ctrl-C to give up)",
            file=sys.stderr,
            flush=True,
        )

    locked = False
    try:
        with folder_lock(folder, waiting) if holder else nullcontext():
            locked = True
            yield
    except KeyboardInterrupt:
        if locked:  # not while waiting: the run's own Ctrl-C
            raise
        print(f"gave up waiting for the run writing to {folder}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


def load_cli_config(args: argparse.Namespace) -> DictConfig:
    """Defaults, then every --cfg file in order, then the overrides; the ovseg section and trainer keys checked too."""
    cfg = with_ovseg_defaults(load_config(args.cfg, overrides=args.overrides))
    check_trainer_keys(cfg.trainer)
    return cfg
