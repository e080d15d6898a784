"""Configuration: defaults, merging order, strict keys with helpful errors."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, TINY
from emerdiff import ConfigError, load_config
from emerdiff.config import schema


def test_base_yaml_states_exactly_the_schema_defaults():
    base = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "base.yaml"))
    assert base == OmegaConf.to_container(schema())


def test_later_files_then_overrides_win(tmp_path: Path):
    other = tmp_path / "other.yaml"
    other.write_text("segmentor:\n  num_masks: 9\n  lam: 3.0\n")
    cfg = load_config(TINY, other, overrides=["segmentor.lam=4"])
    assert cfg.model.pretrained == "tiny" and cfg.segmentor.num_masks == 9 and cfg.segmentor.lam == 4.0
    assert load_config([TINY, other]).segmentor.num_masks == 9


def test_unknown_override_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'segmentor.num_mask'.*segmentor.num_masks"):
        load_config(TINY, overrides=["segmentor.num_mask=3"])


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  pretrain: x\n")
    with pytest.raises(ConfigError, match=r"model.pretrain.*bad.yaml"):
        load_config(bad)


def test_wrongly_typed_value_and_missing_file_are_clear_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="num_masks"):
        load_config(overrides=["segmentor.num_masks=many"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["segmentor.num_masks"])
