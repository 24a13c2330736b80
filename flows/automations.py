"""The server-side automation a cluster needs: mark flow runs whose host died *Crashed*.

A flow run whose machine dies (power, kernel, a killed container) cannot report its end:
it stays *Running* for ever, and nothing retries it. Flow runs send a heartbeat event every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (180 by default, at least 30); this automation
(Prefect's "detect zombie flows" recipe) marks a run *Crashed* when no event of that run
arrived within `within_s` seconds of its last heartbeat. A crashed training run is then
retried by hand (**Retry** in the UI, or trigger it again): it resumes from the `last/`
that the dead run pushed to the artifact root.

Once per server (idempotent: an automation of that name is updated, not duplicated):

    python -m flows.automations                     # within 3 missed heartbeats of the default 180 s
    python -m flows.automations --within 600        # or another window, in seconds

`within_s` must exceed the heartbeat interval of every worker (by a margin: heartbeats are
events, batched and sent over the network), or live runs would be marked Crashed.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from pydantic import BaseModel, Field

ZOMBIE_AUTOMATION = "homer-crash-zombie-flow-runs"


class ZombieSettings(BaseModel):
    """How long a flow run may be silent before it is marked Crashed."""

    within_s: float = Field(600.0, ge=60, description="Seconds after a flow run's last heartbeat (or other event) with "
                                                    "no further event of that run before it is marked Crashed; more "
                                                    "than the workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY (180 s "
                                                    "by default), with a margin for a slow network")


def zombie_automation(settings: ZombieSettings | None = None):
    """The automation: after each `prefect.flow-run.heartbeat` of a run, expect any event of that run within `within_s`."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    settings = settings or ZombieSettings()
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="Marks a flow run Crashed when its heartbeats stop (its host died); retry it to resume (recurrent-homer).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},  # a heartbeat or any state change of the same run
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=settings.within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {settings.within_s:.0f} s: its host died or lost the "
                                            f"server; retry the run to resume")],
    )


def ensure_zombie_automation(settings: ZombieSettings | None = None) -> str:
    """Create the automation on the server PREFECT_API_URL names, or update the one of that name; returns its id."""
    from prefect.client.orchestration import get_client

    wanted = zombie_automation(settings)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if existing:
            client.update_automation(existing[0].id, wanted)
            for extra in existing[1:]:  # two set-ups at once created two: keep one
                client.delete_automation(extra.id)
            return str(existing[0].id)
        return str(client.create_automation(wanted))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.automations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--within", type=float, default=ZombieSettings().within_s,
                        help=ZombieSettings.model_fields["within_s"].description)
    args = parser.parse_args(argv)
    automation_id = ensure_zombie_automation(ZombieSettings(within_s=args.within))
    print(f"automation {ZOMBIE_AUTOMATION} ({automation_id}): flow runs silent for {args.within:.0f} s are marked Crashed")


if __name__ == "__main__":
    main()
