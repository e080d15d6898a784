"""Configuration: defaults, merging order, strict keys with helpful errors."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, TINY
from emerdiff import ConfigError, load_config
from emerdiff.config import (ModelConfig, SegmentorConfig, fingerprint, is_random_model, result_settings, schema,
                             settings_diff)
from ovseg.config import OVSegConfig, ovseg_settings


def test_base_yaml_states_exactly_the_schema_defaults():
    base = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "base.yaml"))
    assert base.pop("ovseg") == OmegaConf.to_container(OmegaConf.structured(OVSegConfig))
    assert base == {k: v for k, v in OmegaConf.to_container(schema()).items() if k != "ovseg"}


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


@pytest.mark.parametrize("override,message", [
    ("segmentor.impl=fastest", "segmentor.impl: fastest is not valid; choose from fast, reference"),
    ("segmentor.num_masks=-3", "segmentor.num_masks must be at least 1, got -3"),
    ("segmentor.resolution=500", "segmentor.resolution must be a multiple of 64, got 500"),
    ("model.dtype=float64", "model.dtype: float64 is not valid; choose from auto, float32, float16, bfloat16"),
    ("eval.protocols=[hungarian,best]", "eval.protocols: best is not valid; choose from hungarian, majority"),
])
def test_a_value_outside_its_fields_rules_is_refused_at_load_naming_the_key_and_valid_values(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(TINY, overrides=[override])


def test_the_ovseg_section_is_checked_by_ovseg_with_the_same_strictness():
    assert ovseg_settings(load_config(TINY, overrides=["ovseg.vocab=voc"])).vocab == "voc"
    with pytest.raises(ConfigError, match=r"unknown config key 'ovseg.vocabs'.*ovseg.vocab"):
        ovseg_settings(load_config(overrides=["ovseg.vocabs=voc"]))
    with pytest.raises(ConfigError, match="ovseg.templates: clip is not valid"):
        ovseg_settings(load_config(overrides=["ovseg.templates=clip"]))


def test_a_broken_yaml_file_is_a_config_error_naming_the_file(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("segmentor:\n  num_masks: [3\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(broken)


@pytest.mark.parametrize("section", [ModelConfig(), SegmentorConfig(), OVSegConfig()])
def test_every_field_changes_the_result_settings_unless_it_is_marked_run_only(section):
    import dataclasses

    base = fingerprint(result_settings(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        other = {bool: lambda v: not v, int: lambda v: v + 64, float: lambda v: v + 1.5,
                 str: lambda v: v + "x", type(None): lambda v: "x", dict: lambda v: {"x": 1.0}}[type(value)](value)
        changed = fingerprint(result_settings(dataclasses.replace(section, **{f.name: other})))
        assert (changed == base) == bool(f.metadata.get("run_only")), f.name
    assert "device" not in result_settings(ModelConfig()) and "memory_budget_gb" not in result_settings(SegmentorConfig())


def test_settings_diff_names_each_changed_key_with_both_values():
    old = fingerprint({"segmentor": {"lam": 10.0, "num_masks": 25}})
    new = fingerprint({"segmentor": {"lam": 5.0, "num_masks": 25}})
    assert settings_diff(old, new) == "segmentor.lam: 10.0 -> 5.0"


def test_random_weights_are_recognised_by_one_rule():
    assert is_random_model(ModelConfig(pretrained="tiny")) and is_random_model({"pretrained": "x", "random_init": True})
    assert not is_random_model(ModelConfig())
