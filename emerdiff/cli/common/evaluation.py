"""The labelled split of eval and ov_eval, what their shared cache of EmerDiff's masks depends on, and their run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from emerdiff.config import ConfigError

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from emerdiff.data import DatasetMetadata
    from emerdiff.evaluation import EvaluationData


def evaluation_split(cfg: DictConfig) -> tuple[DatasetMetadata, EvaluationData]:
    """The labelled split `data.*` names: its classes and its data module; an unknown split or option is a
    ConfigError."""
    from emerdiff.data import dataset_metadata
    from emerdiff.evaluation import EvaluationData

    data = cfg.data
    try:
        return (
            dataset_metadata(data.dataset, data.root, reduce_zero_label=data.reduce_zero_label),
            EvaluationData(
                data.dataset,
                data.root,
                data.size,
                data.image_list,
                data.num_workers,
                crop=cfg.eval.crop,
                reduce_zero_label=data.reduce_zero_label,
            ),
        )
    except ValueError as exc:  # unknown split, an option the split does not take, a folder without a root
        raise ConfigError(str(exc)) from None


def mask_prediction_settings(cfg: DictConfig) -> dict:
    """What EmerDiff's cached predictions of the split depend on (the cache shared by eval and ov_eval)."""
    from emerdiff.evaluation import prediction_settings

    return prediction_settings(
        OmegaConf.to_object(cfg.model),
        OmegaConf.to_object(cfg.segmentor),
        cfg.data.dataset,
        cfg.data.size,
        cfg.eval.crop,
    )


def run_evaluation(
    trainer: pl.Trainer, module: pl.LightningModule, data: pl.LightningDataModule, results_dir: Path
) -> int:
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
