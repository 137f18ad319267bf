"""In-memory state of the simulated services, per tenant and bounded."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from scaiproxy.simulator import catalog, flows
from scaiproxy.simulator.encoding import dumps
from scaiproxy.simulator.flows import CoreDefinition, ExecutionContext

#: Events kept per tenant. Older events are dropped and never returned again.
MAX_EVENTS_PER_TENANT = 10_000
#: Checkpoints kept per tenant; resolved and other finished ones are dropped first.
MAX_CHECKPOINTS_PER_TENANT = 1_000

CHECKPOINT_STATUSES = ("pending", "resolved", "failed", "expired", "cancelled")


@dataclass(frozen=True)
class StoredEvent:
    """An event with its sequence number and its JSON encoded once, at append."""

    seq: int
    core_id: str
    event: dict[str, Any]
    encoded: bytes


@dataclass
class CheckpointRecord:
    seq: int
    body: dict[str, Any]


@dataclass
class PausedExecution:
    """An execution stopped at a checkpoint node, waiting for its resolution."""

    core: CoreDefinition
    context: ExecutionContext
    node_index: int
    checkpoint_id: str
    elapsed_ms: int


@dataclass
class TenantState:
    """Everything one tenant can see. No route reads another tenant's state."""

    tenant_id: str
    cores: dict[str, CoreDefinition]
    scopes: list[dict[str, Any]]
    queues: dict[str, list[dict[str, Any]]]
    bunkers: list[dict[str, Any]]
    events: deque[StoredEvent] = field(
        default_factory=lambda: deque(maxlen=MAX_EVENTS_PER_TENANT)
    )
    checkpoints: dict[str, CheckpointRecord] = field(default_factory=dict)
    paused: dict[str, PausedExecution] = field(default_factory=dict)
    last_event_seq: int = 0
    last_checkpoint_seq: int = 0

    def append_event(self, event: dict[str, Any]) -> StoredEvent:
        self.last_event_seq += 1
        stored = StoredEvent(self.last_event_seq, event["core_id"], event, dumps(event))
        self.events.append(stored)
        return stored

    def events_after(
        self, seq: int, core_id: str | None, limit: int
    ) -> list[StoredEvent]:
        """Return up to ``limit`` events numbered above ``seq``, oldest first."""
        if not self.events:
            return []
        # Sequence numbers are contiguous within the deque, so the start is an offset.
        start = max(0, seq + 1 - self.events[0].seq)
        matching: Iterator[StoredEvent] = islice(self.events, start, None)
        if core_id is not None:
            matching = (stored for stored in matching if stored.core_id == core_id)
        return list(islice(matching, limit))

    def event_dicts(self, core_id: str | None = None) -> list[dict[str, Any]]:
        """Return the stored events, oldest first, optionally of one core only."""
        return [
            stored.event
            for stored in self.events
            if core_id is None or stored.core_id == core_id
        ]

    def add_checkpoint(self, body: dict[str, Any]) -> None:
        self.last_checkpoint_seq += 1
        self.checkpoints[body["id"]] = CheckpointRecord(self.last_checkpoint_seq, body)
        while len(self.checkpoints) > MAX_CHECKPOINTS_PER_TENANT:
            self._drop_oldest_checkpoint()

    def _drop_oldest_checkpoint(self) -> None:
        for checkpoint_id, record in self.checkpoints.items():
            if record.body["status"] != "pending":
                del self.checkpoints[checkpoint_id]
                return
        # Every checkpoint is pending: the oldest one expires and its execution ends.
        checkpoint_id = next(iter(self.checkpoints))
        record = self.checkpoints.pop(checkpoint_id)
        record.body["status"] = "expired"
        self.paused.pop(record.body["execution_id"], None)

    def checkpoints_after(
        self, seq: int, core_id: str | None, status: str, limit: int
    ) -> tuple[list[CheckpointRecord], bool]:
        """Return up to ``limit`` matching checkpoints after ``seq``.

        The second value is True when more checkpoints match after the page.
        """
        page: list[CheckpointRecord] = []
        for record in self.checkpoints.values():
            if record.seq <= seq or record.body["status"] != status:
                continue
            if core_id is not None and record.body["core_id"] != core_id:
                continue
            if len(page) == limit:
                return page, True
            page.append(record)
        return page, False

    def pending_checkpoints(self) -> int:
        return sum(
            1
            for record in self.checkpoints.values()
            if record.body["status"] == "pending"
        )


@dataclass
class SimState:
    """All tenants, the API keys that map to them, and the ScaiVault secrets."""

    seed: int
    tenants: dict[str, TenantState] = field(default_factory=dict)
    api_keys: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def tenant(self, tenant_id: str) -> TenantState:
        """Return the tenant's state, creating it with the demo data on first use.

        A token or API key for a tenant the simulator has not seen still works, so
        tests can pick any tenant id. The new tenant starts without events.
        """
        state = self.tenants.get(tenant_id)
        if state is None:
            state = self._new_tenant(tenant_id)
            self.tenants[tenant_id] = state
        return state

    def _new_tenant(self, tenant_id: str) -> TenantState:
        rng = catalog.tenant_rng(self.seed, tenant_id)
        scopes, queues = catalog.build_scopes(tenant_id, rng)
        cores = flows.TENANT_CORES.get(tenant_id, flows.DEFAULT_CORES)
        return TenantState(
            tenant_id=tenant_id,
            cores={core.core_id: core for core in cores},
            scopes=scopes,
            queues=queues,
            bunkers=catalog.build_bunkers(tenant_id, rng),
        )
