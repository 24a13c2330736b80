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


# ------------------------------------------------------------ each stage keeps its own recipe

PRETRAIN_RECIPE = {"learning_rate": 1e-3, "batch_size": 64, "epochs": 50, "constant_epochs": 5, "grad_clip": 5.0}
FINETUNE_RECIPE = {"learning_rate": 1e-5, "batch_size": 64, "epochs": 50, "constant_epochs": 4, "grad_clip": 5.0}


def _assert_finetune_recipe(train, batch_size=32):
    assert {k: getattr(train, k) for k in FINETUNE_RECIPE} == {**FINETUNE_RECIPE, "batch_size": batch_size}
    assert train.early_stopping_patience is not None and train.precision == "auto"


def test_published_recipe_is_the_default():
    cfg = PipelineConfig()
    assert {k: getattr(cfg.pretrain.train, k) for k in PRETRAIN_RECIPE} == PRETRAIN_RECIPE
    assert {k: getattr(cfg.finetune.train, k) for k in FINETUNE_RECIPE} == FINETUNE_RECIPE
    assert cfg.pretrain.model.dropout == 0.5 and cfg.pretrain.train.early_stopping_patience is not None
    assert cfg.prepare.val_fraction == 0.1 and cfg.prepare.test_fraction == 0.1


def test_partial_override_by_set_keeps_the_finetune_recipe():
    cfg = load_config("default", None, ["finetune.train.batch_size=32"])
    _assert_finetune_recipe(cfg.finetune.train)
    assert {k: getattr(cfg.pretrain.train, k) for k in PRETRAIN_RECIPE} == PRETRAIN_RECIPE
    other = load_config("default", None, ["pretrain.train.epochs=7"])
    assert other.pretrain.train.epochs == 7 and other.pretrain.train.learning_rate == 1e-3
    assert {k: getattr(other.finetune.train, k) for k in FINETUNE_RECIPE} == FINETUNE_RECIPE


def test_partial_override_by_config_file_keeps_the_finetune_recipe(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  train:\n    batch_size: 32\n")
    _assert_finetune_recipe(load_config("default", path).finetune.train)


def test_partial_deployment_parameters_keep_the_finetune_recipe():
    """What a deployment run, the UI's form or `prefect deployment run --params` sends, validated as Prefect does."""
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune
    from flows.pipeline import homer_pipeline

    params = finetune.validate_parameters({"config": {"train": {"batch_size": 32}}})
    _assert_finetune_recipe(params["config"].train)
    params = homer_pipeline.validate_parameters({"config": {"finetune": {"train": {"batch_size": 32}}}})
    _assert_finetune_recipe(params["config"].finetune.train)
    assert params["config"].pretrain.train.learning_rate == 1e-3
    # the run form shows the fine-tuning defaults, not the pretraining ones
    schema = parameter_schema(finetune).model_dump_for_openapi()
    definitions = schema.get("definitions") or schema.get("$defs")
    train_schema = next(d for name, d in definitions.items() if name.startswith("Finetune") and "learning_rate" in d["properties"])
    assert train_schema["properties"]["learning_rate"]["default"] == 1e-5
    assert train_schema["properties"]["constant_epochs"]["default"] == 4


def test_serve_stored_overrides_keep_the_finetune_recipe():
    from flows.serve import deployment_specs

    specs = {s["name"]: s for s in deployment_specs(load_config("default", None, ["finetune.train.batch_size=32"]))}
    assert specs["finetune"]["parameters"] == {"config": {"train": {"batch_size": 32}}}
    assert specs["pretrain"]["parameters"] == {}
    _assert_finetune_recipe(specs["finetune"]["flow"].validate_parameters(specs["finetune"]["parameters"])["config"].train)
    scheduled = specs["scheduled"]
    _assert_finetune_recipe(scheduled["flow"].validate_parameters(scheduled["parameters"])["config"].finetune.train)


def test_config_command_prints_the_finetune_recipe():
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["config", "--json", "--set", "finetune.train.batch_size=32"])
    assert result.exit_code == 0, result.output
    import json

    train = json.loads(result.output)["finetune"]["train"]
    assert (train["learning_rate"], train["constant_epochs"], train["epochs"], train["batch_size"]) == (1e-5, 4, 50, 32)


def test_a_rerun_takes_what_the_last_output_made_but_not_where_it_ran():
    from flows.config import PretrainConfig, start_from_latest
    from model.data.prepare import PrepareConfig

    last = PrepareConfig(seq_len=40, task_runner="dask", dask_address="tcp://10.0.0.9:8786", max_workers=7).model_dump(mode="json")
    rerun = start_from_latest(PrepareConfig.model_validate({"lines_per_doc": 5}), last)
    assert (rerun.seq_len, rerun.lines_per_doc) == (40, 5)  # carried over, and the given field changed
    assert (rerun.task_runner, rerun.dask_address, rerun.max_workers) == ("threads", None, None)  # this run's own

    last = PretrainConfig.model_validate({"train": {"epochs": 3, "nnodes": 2, "rdzv_endpoint": "10.0.0.9:29400",
                                                    "rdzv_id": "old"}}).model_dump(mode="json")
    rerun = start_from_latest(PretrainConfig.model_validate({"train": {"rdzv_endpoint": "10.0.0.5:29400"}}), last)
    assert (rerun.train.epochs, rerun.train.nnodes) == (3, 2)
    assert (rerun.train.rdzv_endpoint, rerun.train.rdzv_id) == ("10.0.0.5:29400", None)
