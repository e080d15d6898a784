"""Naming masks in the commands: the checked `ovseg` section with its vocabulary, and names read back from npz."""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from emerdiff.config import ConfigError
from ovseg.config import OVSegConfig, ovseg_settings

if TYPE_CHECKING:
    from emerdiff.predict.outputs import ExtrasFromArrays
    from ovseg.vocab import Vocabulary


def naming_settings(cfg: DictConfig) -> tuple[OVSegConfig, Vocabulary]:
    """`cfg.ovseg` and its vocabulary, checked before any model loads: a bad value is a ConfigError."""
    from ovseg import read_vocabulary
    from ovseg.labeller import check_settings

    settings = ovseg_settings(cfg)
    try:
        vocab = read_vocabulary(settings.vocab)
        check_settings(settings, vocab)
    except ValueError as exc:  # unknown vocabulary, templates or encoder, threshold without background
        raise ConfigError(str(exc)) from None
    return settings, vocab


def vocabulary_of(cfg: DictConfig) -> str | None:
    """`ovseg.vocab`, also of a config without an ovseg section (a results folder's saved config.yaml)."""
    return (cfg.get("ovseg") or {}).get("vocab")


def saved_names(cfg: DictConfig) -> ExtrasFromArrays | None:
    """For a run that named its masks, the names read back from each image's npz (CLIP does not load); else None."""
    if not vocabulary_of(cfg):
        return None
    from ovseg.outputs import NamedMasks

    return NamedMasks.from_arrays
