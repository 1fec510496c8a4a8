"""Command handlers: starting a workflow (more commands arrive with the NATS API)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from decimal import Decimal

from events.catalogue import WorkflowCreated
from events.errors import ConcurrencyError
from events.store import EventStore
from rebalancer.accounts import Accounts
from rebalancer.specs.models import WorkflowSpec
from rebalancer.specs.validation import dump_params, resolve_params, validate_spec

# Workflow ids are derived from command ids, so a repeated start command finds its workflow
# instead of starting a second one.
COMMAND_NAMESPACE = uuid.UUID("6f1c2a8e-3f5b-4d7e-9a41-52b8c0d7e913")


def workflow_id_for(command_id: str) -> str:
    return str(uuid.uuid5(COMMAND_NAMESPACE, command_id))


async def start_workflow(
    store: EventStore,
    spec: WorkflowSpec,
    params: Mapping[str, str | Decimal | int],
    accounts: Accounts,
    *,
    command_id: str | None = None,
    actor: str = "cli",
) -> tuple[str, bool]:
    """Validate the spec and parameters, then append WorkflowCreated.

    Returns (workflow id, created now). Raises SpecError before anything is appended when the
    spec or a parameter is bad; a repeated `command_id` returns the first workflow's id.
    """
    validate_spec(spec, accounts)
    resolved = resolve_params(spec, params, accounts)
    command_id = command_id or f"start-{uuid.uuid4()}"
    workflow_id = workflow_id_for(command_id)
    event = WorkflowCreated(
        spec_name=spec.name,
        spec=spec.model_dump(mode="json"),
        params=dump_params(resolved),
        command_id=command_id,
    )
    try:
        await store.append(
            f"workflow-{workflow_id}",
            [event],
            0,
            metadata={"command_id": command_id, "actor": actor},
        )
    except ConcurrencyError:
        return workflow_id, False
    return workflow_id, True
