"""The labelled split of eval and ov_eval, and what their shared cache of EmerDiff's masks depends on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

from omegaconf import DictConfig, OmegaConf

from emerdiff.config import ConfigError

if TYPE_CHECKING:
    from emerdiff.data import DatasetMetadata
    from emerdiff.evaluation import EvaluationData


def evaluation_split(cfg: DictConfig) -> Tuple["DatasetMetadata", "EvaluationData"]:
    """The labelled split `data.*` names: its classes and its data module; an unknown split or option is a
    ConfigError."""
    from emerdiff.data import dataset_metadata
    from emerdiff.evaluation import EvaluationData

    data = cfg.data
    try:
        return (dataset_metadata(data.dataset, data.root, reduce_zero_label=data.reduce_zero_label),
                EvaluationData(data.dataset, data.root, data.size, data.image_list, data.num_workers,
                               crop=cfg.eval.crop, reduce_zero_label=data.reduce_zero_label))
    except ValueError as exc:  # unknown split, an option the split does not take, a folder without a root
        raise ConfigError(str(exc)) from None


def mask_prediction_settings(cfg: DictConfig) -> dict:
    """What EmerDiff's cached predictions of the split depend on (the cache shared by eval and ov_eval)."""
    from emerdiff.evaluation import prediction_settings

    return prediction_settings(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.segmentor), cfg.data.dataset,
                               cfg.data.size, cfg.eval.crop)
