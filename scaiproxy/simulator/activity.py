"""Seeded history and background invocations, so the event stream is never empty."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from scaiproxy.simulator.options import SimOptions
from scaiproxy.simulator.runtime import Runtime

logger = logging.getLogger("scaiproxy.simulator")

#: Tenants created at start-up, with their own cores, history and demo API keys.
SEEDED_TENANTS = ("acme", "globex")

# Background activity stops creating checkpoints once a tenant has this many
# pending, so an unattended simulator does not fill up with paused executions.
MAX_BACKGROUND_PENDING = 5


@dataclass(frozen=True)
class SampleInvocation:
    core_id: str
    input: dict[str, Any] = field(default_factory=dict)
    entity_id: str | None = None
    pauses: bool = False


SAMPLES: tuple[SampleInvocation, ...] = (
    SampleInvocation(
        "core_support_triage",
        {"ticket_id": "T-1042", "message": "Bonjour, j'ai été facturé deux fois."},
    ),
    SampleInvocation(
        "core_support_triage",
        {"ticket_id": "T-1043", "message": "Wo ist mein Paket? 📦", "priority": "high"},
        pauses=True,
    ),
    SampleInvocation(
        "core_invoice_review", {"invoice_id": "INV-2026-0042", "amount": 840}
    ),
    SampleInvocation(
        "core_invoice_review",
        {"invoice_id": "INV-2026-0077", "amount": 25_000},
        pauses=True,
    ),
    SampleInvocation("core_debug_demo", {"note": "step through"}, pauses=True),
    SampleInvocation("core_flaky", {}),
    SampleInvocation("core_flaky", {"succeed": True}),
    SampleInvocation(
        "core_order_routing",
        {"order_id": "SO-77812", "destination": "Kraków, Polska"},
        entity_id="customer_0815",
    ),
)


def seed_history(runtime: Runtime, tenant_id: str) -> None:
    """Record a few finished, failed and paused executions for a seeded tenant.

    Each seeded tenant ends up with one pending checkpoint, one resolved, and one
    each in the expired, cancelled and failed states.
    """
    tenant = runtime.state.tenant(tenant_id)
    for sample in SAMPLES:
        if sample.core_id not in tenant.cores or sample.core_id == "core_debug_demo":
            continue
        if sample.pauses and tenant.pending_checkpoints() > 0:
            continue
        runtime.invoke(tenant_id, sample.core_id, dict(sample.input), sample.entity_id)

    paused = runtime.invoke(tenant_id, "core_debug_demo", {"note": "seeded run"})
    runtime.resolve(
        tenant_id, paused["checkpoint_id"], "continue", "Looks fine.", "seed"
    )
    _add_closed_checkpoints(runtime, tenant_id)


def _add_closed_checkpoints(runtime: Runtime, tenant_id: str) -> None:
    tenant = runtime.state.tenant(tenant_id)
    closed = (
        ("core_invoice_review", "node_approval", "approval", "expired"),
        ("core_debug_demo", "node_breakpoint", "debug_breakpoint", "cancelled"),
        ("core_invoice_review", "node_approval", "hitl_review", "failed"),
    )
    for core_id, node_id, checkpoint_type, status in closed:
        checkpoint: dict[str, Any] = {
            "id": runtime.new_id("ckpt"),
            "core_id": core_id,
            "execution_id": runtime.new_id("exec"),
            "node_id": node_id,
            "checkpoint_type": checkpoint_type,
            "status": status,
        }
        if checkpoint_type == "debug_breakpoint":
            checkpoint["prompt"] = "Paused at node_breakpoint. Continue?"
            options = ["continue"]
        else:
            checkpoint["presentation"] = {
                "title": "Approval needed",
                "message": "A reviewer must decide before the flow continues.",
            }
            options = ["approve", "reject"]
        checkpoint.update(
            options=options,
            created_at=runtime.now(),
            resolved_at=None,
            resolution=None,
            comment=None,
            resolved_by=None,
        )
        tenant.add_checkpoint(checkpoint)


def invoke_random_sample(runtime: Runtime, rng: random.Random, tenant_id: str) -> None:
    """Invoke one of the tenant's demo cores with a random sample input."""
    tenant = runtime.state.tenant(tenant_id)
    allow_pause = tenant.pending_checkpoints() < MAX_BACKGROUND_PENDING
    candidates = [
        sample
        for sample in SAMPLES
        if sample.core_id in tenant.cores and (allow_pause or not sample.pauses)
    ]
    # Pausing samples are picked a quarter as often, so checkpoints stay occasional.
    weights = [1 if sample.pauses else 4 for sample in candidates]
    sample = rng.choices(candidates, weights=weights)[0]
    runtime.invoke(tenant_id, sample.core_id, dict(sample.input), sample.entity_id)


async def run_background_activity(
    runtime: Runtime, options: SimOptions, rng: random.Random
) -> None:
    """Invoke a demo core for each seeded tenant every ``activity_interval_s``.

    The loop ends when the interval is set to None, or when the task is cancelled.
    """
    logger.info("background activity started, every %s s", options.activity_interval_s)
    try:
        while options.activity_interval_s is not None:
            await asyncio.sleep(options.activity_interval_s)
            for tenant_id in SEEDED_TENANTS:
                try:
                    invoke_random_sample(runtime, rng, tenant_id)
                except Exception:
                    # One broken sample must not stop the stream for every tenant.
                    logger.exception(
                        "background invocation failed for tenant %s", tenant_id
                    )
    finally:
        logger.info("background activity stopped")
