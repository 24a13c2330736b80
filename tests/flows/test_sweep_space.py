"""`homer sweep`'s search space against the config (no Prefect server, no training): the default spaces fit every
profile, and a bad space file is refused before anything runs, naming the file and each field."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.config import PROFILES, load_config
from flows.sweep import check_space, trial_config
from model.training.sweep import DEFAULT_SPACES, SpaceError, space_values


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("stage", sorted(DEFAULT_SPACES))
def test_the_default_spaces_fit_every_profile(stage, profile):
    cfg = load_config(profile)
    space = check_space(stage, cfg, DEFAULT_SPACES[stage], "the default space")
    for key, dist in space.items():
        for value in space_values(dist):
            changed = trial_config(cfg, {key: value})
            section, *path = key.split(".")
            node = getattr(changed, section)
            for part in path:
                node = getattr(node, part)
            assert node == value


def test_a_value_the_config_refuses_is_named_with_the_field():
    with pytest.raises(SpaceError) as err:
        check_space("finetune", load_config("sample"), {"finetune.train.batch_size": {"choices": [16, 0]},
                                                         "finetune.init_from": {"choices": [None, "abc"]}}, "s.yaml")
    assert str(err.value).splitlines() == [
        "1 problem(s) in the search space s.yaml:",
        "  - finetune.train.batch_size: 0 is not a valid value (Input should be greater than 0)"]


def test_a_bad_space_file_is_refused_naming_the_file_and_field(tmp_path):
    from flows.cli import app

    space_file = tmp_path / "space.yaml"
    space_file.write_text("pretrain.model.dropout: {low: 0.0, high: 1.5}\npretrain.train.lr: {low: 1, high: 2}\n")
    result = CliRunner().invoke(app, ["sweep", "pretrain", "--profile", "sample", "--space", str(space_file),
                                      "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 2
    assert f"2 problem(s) in the search space {space_file}" in result.output, result.output
    assert "pretrain.train.lr: no such config field\n" in result.output
    assert "pretrain.model.dropout: 1.5 is not a valid value (Input should be less than 1)" in result.output
    assert not (tmp_path / "data").exists()  # refused before anything ran
    missing = CliRunner().invoke(app, ["sweep", "pretrain", "--space", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and f"--space {tmp_path / 'nope.yaml'}: cannot read" in missing.output
    wrong = CliRunner().invoke(app, ["sweep", "report"])
    assert wrong.exit_code == 2 and "a sweep tunes pretrain or finetune, not 'report'" in wrong.output


def test_the_sweep_flows_pickle_as_a_served_deployment_pickles_them():
    """`homer serve` starts each flow run from the flow pickled by value, with the globals it names (a ContextVar
    among them failed every served trial before it started)."""
    import cloudpickle

    from flows.sweep import homer_sweep, sweep_trial

    trial = {"stage": "pretrain", "storage": "/tmp/s.journal", "study": "s", "number": 0, "trial_id": 0}
    for flow, parameters in ((homer_sweep, {"stage": "finetune"}), (sweep_trial, {"trial": trial})):
        copy = cloudpickle.loads(cloudpickle.dumps(flow))
        assert copy.name == flow.name
        # the worker validates the run's parameters with the copy: its types must resolve without the module's globals
        assert copy.validate_parameters(parameters).keys() >= parameters.keys()
