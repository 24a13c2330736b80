"""A training process takes its share of the cores, rebalanced as trainings start and end."""

from __future__ import annotations

import torch

from model.training.threads import CoreShare, available_cores, live_trainings


def test_trainings_share_the_cores_and_give_them_back(tmp_path):
    cores, before = available_cores(), torch.get_num_threads()
    with CoreShare(registry=tmp_path) as first:
        assert live_trainings(tmp_path) == 1 and first.threads == cores == torch.get_num_threads()
        with CoreShare(registry=tmp_path) as second:
            assert live_trainings(tmp_path) == 2 and second.threads == max(1, cores // 2)
            first.rebalance(force=True)
            assert first.threads == max(1, cores // 2)
        first.rebalance(force=True)  # the other training ended: its cores come back
        assert live_trainings(tmp_path) == 1 and first.threads == cores
    assert live_trainings(tmp_path) == 0 and torch.get_num_threads() == before


def test_a_dead_trainings_registration_is_not_counted(tmp_path):
    (tmp_path / "12345-1.lock").write_text("")  # left by a process killed before it could clean up
    assert live_trainings(tmp_path) == 0 and not list(tmp_path.iterdir())


def test_num_threads_fixes_the_count(tmp_path):
    with CoreShare(fixed=1, registry=tmp_path) as share:
        assert share.threads == 1 == torch.get_num_threads() and live_trainings(tmp_path) == 0
