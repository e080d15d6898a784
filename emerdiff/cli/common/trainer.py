"""The Lightning side of the commands: the Trainer from the `trainer:` section, its logger and progress bar, and
the segmentor in the dtype of the Trainer's device."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from emerdiff.config import ConfigError, ModelConfig, SegmentorConfig, plain, section

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from emerdiff import EmerDiff

LOGGERS = ("csv", "tensorboard")  # trainer.logger, besides false (none) and true (Lightning's default)


def trainer_arguments() -> list[str]:
    """The keyword arguments pytorch_lightning.Trainer accepts."""
    import pytorch_lightning as pl

    return [name for name in inspect.signature(pl.Trainer.__init__).parameters if name != "self"]


def check_trainer_keys(settings: Mapping[str, Any]) -> None:
    """Raise ConfigError naming any `trainer.KEY` that is not an argument of Trainer, or a `trainer.devices` value
    Lightning would refuse only after the models load."""
    check_devices(settings.get("devices", "auto"))
    valid = trainer_arguments()
    for key in settings:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {', '.join(f'trainer.{c}' for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown config key 'trainer.{key}': not an argument of pytorch_lightning.Trainer."
                f"{hint} Valid: {', '.join(valid)}."
            )


def check_devices(devices: Any) -> None:
    """`trainer.devices`: a count, -1 (all), auto, a list of indices, or indices as text ("0,1")."""
    if isinstance(devices, bool):
        ok = False
    elif isinstance(devices, int) or devices == "auto":
        ok = isinstance(devices, str) or devices >= -1
    elif isinstance(devices, str):
        ok = all(part.strip().lstrip("-").isdigit() for part in devices.strip(",").split(",")) if devices else False
    else:
        ok = all(isinstance(index, int) and not isinstance(index, bool) and index >= 0 for index in devices)
    if not ok:
        raise ConfigError(
            f"trainer.devices={devices!r} is not valid: give a number of devices (e.g. 1, 4; -1 for "
            'all), auto, or device indices (e.g. [0, 2] or "0,2")'
        )


def build_trainer(settings: Mapping[str, Any], **tool_arguments: Any) -> pl.Trainer:
    """Trainer(**cfg.trainer, **tool_arguments); a key both set is an error naming it.

    `trainer.logger` takes csv or tensorboard (written under the run's folder, default_root_dir/logs), true for
    Lightning's default, or false (the default): eval and ov_eval log their scores there.
    """
    import pytorch_lightning as pl

    options = plain(settings, resolve=True) if isinstance(settings, DictConfig) else dict(settings)
    check_trainer_keys(options)
    clash = sorted(options.keys() & tool_arguments.keys())
    if clash:
        raise ConfigError(f"{', '.join(f'trainer.{k}' for k in clash)} cannot be configured: this tool sets it")
    logger = build_logger(options.pop("logger", False), tool_arguments.get("default_root_dir", "."))
    return pl.Trainer(**options, logger=logger, **tool_arguments)


def progress_bar(settings: Mapping[str, Any]) -> list[Any]:
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
            raise ConfigError(
                f"trainer.logger=tensorboard needs TensorBoard ({exc}): pip install tensorboard, "
                "or use trainer.logger=csv"
            ) from None
    raise ConfigError(f"trainer.logger: {choice!r} is not valid; choose from false, true, {', '.join(LOGGERS)}")


def build_segmentor(cfg: DictConfig, trainer: pl.Trainer) -> EmerDiff:
    """EmerDiff on the CPU, in the dtype `model.dtype` means on the Trainer's device; Lightning moves it there. Each of
    the Trainer's processes on this machine takes its share of the CPU cores (unless model.cpu_threads says)."""
    from emerdiff import EmerDiff
    from emerdiff.models import load_sd, resolve_dtype

    model = section(cfg.model, ModelConfig)
    dtype = resolve_dtype(model.dtype, trainer.strategy.root_device)
    model = replace(model, dtype=str(dtype).removeprefix("torch."))
    return EmerDiff(
        load_sd(model, device="cpu", local_ranks=trainer.num_devices), section(cfg.segmentor, SegmentorConfig)
    )
