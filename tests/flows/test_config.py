"""The typed config: defaults, profiles, YAML files, --set, and every problem at once."""

from __future__ import annotations

import pytest

from flows.config import ConfigError, PipelineConfig, load_config


def test_defaults_are_the_published_recipe():
    cfg = PipelineConfig()
    assert (cfg.wikipedia.source, cfg.wikipedia.dataset, cfg.wikipedia.config_name, cfg.wikipedia.max_articles) == (
        "hub", "wikimedia/wikipedia", "20231101.en", 8000)
    assert (cfg.simpsons.source, cfg.simpsons.handle, cfg.simpsons.character) == (
        "kaggle", "pierremegret/dialogue-lines-of-the-simpsons", "Homer Simpson")
    assert cfg.prepare.seq_len == 100
    assert cfg.pretrain.model.hidden_sizes == [256, 512, 1024, 512, 256] and cfg.pretrain.train.learning_rate == 1e-3
    assert cfg.finetune.train.learning_rate == 1e-5 and cfg.finetune.train.constant_epochs == 4


def test_sample_profile_file_and_sets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n  seq_len: 64\nsimpsons:\n  character: Marge Simpson\n")
    cfg = load_config("sample", path, ["prepare.seq_len=32", "wikipedia.max_articles=10", "pretrain.model.hidden_sizes=[64, 64]"])
    assert cfg.wikipedia.source == "sample" and cfg.simpsons.source == "sample" and cfg.profile == "sample"
    assert cfg.prepare.seq_len == 32 and cfg.simpsons.character == "Marge Simpson"
    assert cfg.wikipedia.max_articles == 10 and cfg.pretrain.model.hidden_sizes == [64, 64]


def test_required_keys_exist_with_their_names():
    cfg = load_config("default", None, [
        "wikipedia.source=local", "wikipedia.path=/x.jsonl", "wikipedia.max_articles=5",
        "simpsons.source=local", "simpsons.path=/s.csv", "simpsons.character=Bart Simpson",
        "prepare.seq_len=50", "prepare.val_fraction=0.2",
    ])
    assert (cfg.wikipedia.path, cfg.simpsons.path, cfg.simpsons.character, cfg.prepare.val_fraction) == (
        "/x.jsonl", "/s.csv", "Bart Simpson", 0.2)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("default", None, ["prepare.seq_len=abc", "wikipedia.source=ftp", "prepare.seqlen=5",
                                      "simpsons.source=local", "nonsense"])
    message = str(err.value)
    for needle in ("prepare.seq_len", "wikipedia.source", "prepare.seqlen", "simpsons.path", "'nonsense'"):
        assert needle in message, needle


def test_bad_profile_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config("huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config("default", bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("default", tmp_path / "missing.yaml")
