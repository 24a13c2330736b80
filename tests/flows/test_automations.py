"""flows/automations.py against the session's Prefect test server: the zombie automation, created once, updated in place."""

from __future__ import annotations

from datetime import timedelta

import pytest

from flows.automations import ZOMBIE_AUTOMATION, ZombieSettings, ensure_zombie_automation

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_the_zombie_automation_is_created_once_and_updated_in_place():
    from prefect.client.orchestration import get_client

    first = ensure_zombie_automation(ZombieSettings(within_s=600))
    again = ensure_zombie_automation(ZombieSettings(within_s=120))
    with get_client(sync_client=True) as client:
        (automation,) = client.read_automations_by_name(ZOMBIE_AUTOMATION)
    assert str(automation.id) == first == again
    trigger = automation.trigger
    assert trigger.after == {"prefect.flow-run.heartbeat"} and trigger.expect == {"prefect.flow-run.*"}
    assert trigger.for_each == {"prefect.resource.id"} and trigger.within == timedelta(seconds=120)
    (action,) = automation.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"


def test_a_window_shorter_than_a_minute_is_refused():
    with pytest.raises(ValueError, match="within_s"):
        ZombieSettings(within_s=10)
