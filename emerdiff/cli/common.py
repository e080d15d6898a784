"""Command-line plumbing shared by the tools: repeated --cfg, key=value overrides, the Trainer from `trainer:`.

Configs merge in order: the defaults (configs/base.yaml), each --cfg file (later files win), then the
key=value overrides. Unknown keys are errors that name the key, in `trainer` too (checked against
the arguments of pytorch_lightning.Trainer). Only light modules are imported here at start-up, so
`--help` and a config mistake answer before torch, Lightning and diffusers load.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import sys
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, List, Mapping, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from emerdiff.config import ConfigError, UserError, is_random_model, load_config
from ovseg.config import OVSegConfig, ovseg_settings as checked_ovseg_section, with_ovseg_defaults

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from emerdiff import EmerDiff
    from emerdiff.data import DatasetMetadata
    from emerdiff.evaluation import EvaluationData
    from emerdiff.predict.outputs import ExtrasFromArrays
    from ovseg.vocab import Vocabulary

RANDOM_MODEL_NOTICE = ("note: model.pretrained={name} is a miniature model with random weights: it runs offline, "
                       "but its masks carry no meaning. Use e.g. --cfg emerdiff_sd15 for real results.")
LOGGERS = ("csv", "tensorboard")  # trainer.logger, besides false (none) and true (Lightning's default)
# Library messages a user can do nothing about: Lightning's hardware lines and product tips (INFO), and a
# deprecation inside Lightning's own code.
QUIET_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")
QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
OVERRIDES_HELP = "config overrides applied after the files, e.g. segmentor.num_masks=10 trainer.devices=4"


def base_parser(description: str, overrides_help: str = OVERRIDES_HELP) -> argparse.ArgumentParser:
    """A parser with the options every tool shares: --cfg (repeatable) and key=value overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg", action="append", default=[], metavar="YAML",
                        help="config file, or a shipped config by name (tiny, emerdiff_sd15, eval/voc, ov/ade150, ...); "
                             "give it several times, later files override earlier ones")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """Parse, allowing key=value overrides before, between and after the options; then quiet the libraries."""
    args = parser.parse_intermixed_args(argv)
    quiet_libraries()
    return args


def quiet_libraries() -> None:
    """Hide the libraries' messages that ask nothing of the user (QUIET_LOGGERS, QUIET_WARNINGS); warnings stay."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def plural(count: int, noun: str) -> str:
    """'1 image', '3 images'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def add_output_arguments(parser: argparse.ArgumentParser, overwrite_help: str) -> None:
    """--output DIR (output.dir) and --overwrite (output.overwrite=true), shared by the tools that write results."""
    parser.add_argument("--output", help="results folder (output.dir)")
    parser.add_argument("--overwrite", action="store_true", help=f"{overwrite_help} (output.overwrite=true)")


def apply_output_arguments(cfg: DictConfig, args: argparse.Namespace) -> None:
    """Let --output and --overwrite win over the config files."""
    cfg.output.dir = args.output or cfg.output.dir
    cfg.output.overwrite = args.overwrite or cfg.output.overwrite


def load_cli_config(args: argparse.Namespace) -> DictConfig:
    """Defaults, then every --cfg file in order, then the overrides; the ovseg section and trainer keys checked too."""
    cfg = with_ovseg_defaults(load_config(args.cfg, overrides=args.overrides))
    check_trainer_keys(cfg.trainer)
    return cfg


def trainer_arguments() -> List[str]:
    """The keyword arguments pytorch_lightning.Trainer accepts."""
    import pytorch_lightning as pl

    return [name for name in inspect.signature(pl.Trainer.__init__).parameters if name != "self"]


def check_trainer_keys(settings: Mapping[str, Any]) -> None:
    """Raise ConfigError naming any `trainer.KEY` that is not an argument of Trainer."""
    valid = trainer_arguments()
    for key in settings:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {', '.join(f'trainer.{c}' for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key 'trainer.{key}': not an argument of pytorch_lightning.Trainer."
                              f"{hint} Valid: {', '.join(valid)}.")


def build_trainer(settings: Mapping[str, Any], **tool_arguments: Any) -> "pl.Trainer":
    """Trainer(**cfg.trainer, **tool_arguments); a key both set is an error naming it.

    `trainer.logger` takes csv or tensorboard (written under the run's folder, default_root_dir/logs), true for
    Lightning's default, or false (the default): eval and ov_eval log their scores there.
    """
    import pytorch_lightning as pl

    settings = OmegaConf.to_container(settings, resolve=True) if isinstance(settings, DictConfig) else dict(settings)
    check_trainer_keys(settings)
    clash = sorted(settings.keys() & tool_arguments.keys())
    if clash:
        raise ConfigError(f"{', '.join(f'trainer.{k}' for k in clash)} cannot be configured: this tool sets it")
    logger = build_logger(settings.pop("logger", False), tool_arguments.get("default_root_dir", "."))
    return pl.Trainer(**settings, logger=logger, **tool_arguments)


def progress_bar(settings: Mapping[str, Any]) -> List[Any]:
    """[the bar counting images/s], unless `trainer.enable_progress_bar` is false: Trainer callbacks."""
    if not settings.get("enable_progress_bar", True):
        return []
    from emerdiff.predict import ImagesProgressBar

    return [ImagesProgressBar()]


def build_logger(choice: Any, folder: str) -> Any:
    """`trainer.logger` as Lightning takes it: False, True, or a CSV / TensorBoard logger writing to FOLDER/logs."""
    if isinstance(choice, bool) or choice is None:
        return bool(choice)
    if choice == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(folder, name="logs")
    if choice == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        try:
            return TensorBoardLogger(folder, name="logs")
        except ModuleNotFoundError as exc:
            raise ConfigError(f"trainer.logger=tensorboard needs TensorBoard ({exc}): pip install tensorboard, "
                              "or use trainer.logger=csv") from None
    raise ConfigError(f"trainer.logger: {choice!r} is not valid; choose from false, true, {', '.join(LOGGERS)}")


def build_segmentor(cfg: DictConfig, trainer: "pl.Trainer") -> "EmerDiff":
    """EmerDiff on the CPU, in the dtype `model.dtype` means on the Trainer's device; Lightning moves it there."""
    from emerdiff import EmerDiff
    from emerdiff.models import load_sd, resolve_dtype

    model = OmegaConf.to_object(cfg.model)
    dtype = resolve_dtype(model.dtype, trainer.strategy.root_device)
    model = replace(model, dtype=str(dtype).removeprefix("torch."))
    return EmerDiff(load_sd(model, device="cpu"), OmegaConf.to_object(cfg.segmentor))


def ovseg_settings(cfg: DictConfig) -> Tuple[OVSegConfig, "Vocabulary"]:
    """`cfg.ovseg` and its vocabulary, checked before any model loads: a bad value is a ConfigError."""
    from ovseg import read_vocabulary
    from ovseg.pipeline import check_settings

    settings = checked_ovseg_section(cfg)
    try:
        vocab = read_vocabulary(settings.vocab)
        check_settings(settings, vocab)
    except ValueError as exc:  # unknown vocabulary, templates or encoder, threshold without background
        raise ConfigError(str(exc)) from None
    return settings, vocab


def vocabulary_of(cfg: DictConfig) -> Optional[str]:
    """`ovseg.vocab`, also of a config without an ovseg section (a results folder's saved config.yaml)."""
    return (cfg.get("ovseg") or {}).get("vocab")


def saved_names(cfg: DictConfig) -> Optional["ExtrasFromArrays"]:
    """For a run that named its masks, the names read back from each image's npz (CLIP does not load); else None."""
    if not vocabulary_of(cfg):
        return None
    from ovseg.outputs import NamedMasks

    return NamedMasks.from_arrays


def evaluation_split(cfg: DictConfig) -> Tuple["DatasetMetadata", "EvaluationData"]:
    """The labelled split `data.*` names: its classes and its data module; an unknown split or option is a
    ConfigError."""
    from emerdiff.data import dataset_metadata
    from emerdiff.evaluation import EvaluationData

    data = cfg.data
    try:
        return (dataset_metadata(data.dataset, data.root, data.reduce_zero_label),
                EvaluationData(data.dataset, data.root, data.size, data.image_list, data.num_workers,
                               crop=cfg.eval.crop, reduce_zero_label=data.reduce_zero_label))
    except ValueError as exc:  # unknown split, an option the split does not take, a folder without a root
        raise ConfigError(str(exc)) from None


def mask_prediction_settings(cfg: DictConfig) -> dict:
    """What EmerDiff's cached predictions of the split depend on (the cache shared by eval and ov_eval)."""
    from emerdiff.evaluation import prediction_settings

    return prediction_settings(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.segmentor), cfg.data.dataset,
                               cfg.data.size, cfg.eval.crop)


def run_evaluation(trainer: "pl.Trainer", module: "pl.LightningModule", data: "pl.LightningDataModule",
                   results_dir: Path) -> int:
    """Run `trainer.test` (a stale cache becomes a config error); rank 0 then prints the results table.

    A run stopped by a signal (`emerdiff.stopping`) keeps its cached predictions and returns its exit code.
    """
    from emerdiff.evaluation import StaleCacheError
    from emerdiff.stopping import RunStopped

    try:
        trainer.test(module, datamodule=data, verbose=False)
    except StaleCacheError as exc:
        raise ConfigError(str(exc)) from None
    except RunStopped as stop:
        print(f"{stop}: the predictions made so far are cached; rerun the same command to continue", file=sys.stderr)
        return stop.exit_code
    if trainer.is_global_zero:
        print((Path(results_dir) / "results.md").read_text())
        print(f"results: {Path(results_dir) / 'results.json'} and {Path(results_dir) / 'results.md'}")
    return 0


def random_model_notice(cfg: DictConfig) -> Optional[str]:
    """The warning for the tiny / random-weight models, or None for real weights."""
    if not is_random_model(cfg.model):
        return None
    name = "tiny" if cfg.model.pretrained == "tiny" else f"{cfg.model.pretrained} (model.random_init=true)"
    return RANDOM_MODEL_NOTICE.format(name=name)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn a user's mistake (config, input, weights) into `error: ...` on stderr and exit status 2."""
    try:
        yield
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


def user_message(exc: BaseException) -> str:
    """The exception's message; for one re-raised from a DataLoader worker, the original message alone.

    PyTorch re-raises a worker's exception with "Caught X in DataLoader worker process N" and the worker's
    traceback as its text; the last line of that is "module.X: message".
    """
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        return text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text
