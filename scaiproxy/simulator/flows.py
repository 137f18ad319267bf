"""Demo cores: flows of nodes that the simulated runtime walks through.

Node ids, block kinds and result bindings follow what the ScaiFlow compiler emits.
Values are computed from the invocation input and a per-execution random
generator, so the same input and execution id always give the same events.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# Eight of the fourteen block kinds of ScaiCore's IR; the demo flows use only these.
BLOCK_KINDS = (
    "rigid",
    "flexible",
    "guarded",
    "model_call",
    "parallel",
    "checkpoint",
    "foreach",
    "while",
)

# An amount in minor units beyond 64 bits: clients must pass it through exactly.
HUGE_TOTAL_MINOR_UNITS = 2**70 + 4242


@dataclass
class ExecutionContext:
    """Input and bindings of one execution, as a node's functions read them."""

    execution_id: str
    core_id: str
    input: dict[str, Any]
    instance_key: str | None
    rng: random.Random
    bindings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Emitted:
    """An event that a node emits after it exits.

    With ``from_node`` the event's ``payload.node_id`` is the emitting node, as for
    a flow author's ``@emit``. Module events such as ``scaiqueue.message.completed``
    set it to None.
    """

    type: str
    payload: dict[str, Any]
    from_node: bool = True


@dataclass(frozen=True)
class CheckpointSpec:
    """The checkpoint a ``checkpoint`` node creates when the execution reaches it."""

    checkpoint_type: str
    options: tuple[str, ...]
    title: str | None = None
    message: Callable[[ExecutionContext], str] | None = None
    prompt: str | None = None


def _none(ctx: ExecutionContext) -> Any:
    return None


@dataclass(frozen=True)
class Node:
    """One block of a flow.

    ``fails`` returns the error object when the node fails for this input, None
    otherwise. ``when`` returning False skips the node without any event, as a
    branch not taken. Children run between the node's entered and exited events.
    Checkpoints are only supported as top-level nodes.
    """

    node_id: str
    block_kind: str
    result_binding: str | None
    value: Callable[[ExecutionContext], Any] = _none
    duration_ms: int = 5
    when: Callable[[ExecutionContext], bool] | None = None
    fails: Callable[[ExecutionContext], dict[str, Any] | None] | None = None
    checkpoint: CheckpointSpec | None = None
    emits: Callable[[ExecutionContext], list[Emitted]] | None = None
    children: tuple[Node, ...] = ()

    def __post_init__(self) -> None:
        if self.block_kind not in BLOCK_KINDS:
            raise ValueError(f"{self.node_id}: unknown block kind {self.block_kind!r}")
        if (self.block_kind == "checkpoint") != (self.checkpoint is not None):
            raise ValueError(f"{self.node_id}: checkpoint nodes need a CheckpointSpec")
        if any(child.checkpoint for child in self.walk_children()):
            raise ValueError(f"{self.node_id}: a checkpoint cannot be a child node")

    def walk_children(self) -> Iterator[Node]:
        for child in self.children:
            yield child
            yield from child.walk_children()


@dataclass(frozen=True)
class CoreDefinition:
    """A deployed core: its flow and how its output is built from the bindings."""

    core_id: str
    name: str
    description: str
    source_file: str
    nodes: tuple[Node, ...]
    output: Callable[[ExecutionContext], Any]
    mode: str = "stateless"
    source_lines: Mapping[str, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Give each node a plausible line in the flow's source file.
        lines: dict[str, int] = {}
        for index, node in enumerate(self.all_nodes()):
            if node.node_id in lines:
                raise ValueError(f"{self.core_id}: duplicate node id {node.node_id}")
            lines[node.node_id] = 12 + 7 * index
        object.__setattr__(self, "source_lines", lines)

    def all_nodes(self) -> Iterator[Node]:
        for node in self.nodes:
            yield node
            yield from node.walk_children()

    def describe(self) -> dict[str, Any]:
        """Build the core's entry in ``GET /v1/modules/scaicore/cores``."""
        return {
            "id": self.core_id,
            "name": self.name,
            "description": self.description,
            "mode": self.mode,
            "status": "deployed",
            "version": 3,
            "source_file": self.source_file,
            "nodes": [
                {
                    "node_id": node.node_id,
                    "block_kind": node.block_kind,
                    "result_binding": node.result_binding,
                }
                for node in self.all_nodes()
            ],
        }


# --- core_support_triage ---------------------------------------------------------

_CATEGORIES = ("billing", "shipping", "technical", "account")


def _ticket(ctx: ExecutionContext) -> dict[str, Any]:
    return {
        "ticket_id": str(ctx.input.get("ticket_id", "T-1042")),
        "subject": str(ctx.input.get("subject", "Réclamation : facture n° 42 ✉️")),
        "body": str(ctx.input.get("message", "Bonjour, j'ai été facturé deux fois.")),
        "priority": ctx.input.get("priority", "normal"),
    }


def _classification(ctx: ExecutionContext) -> dict[str, Any]:
    body = ctx.bindings["ticket"]["body"]
    category = _CATEGORIES[zlib.crc32(body.encode("utf-8")) % len(_CATEGORIES)]
    return {
        "category": category,
        "confidence": round(0.8 + ctx.rng.random() * 0.19, 3),
        "language": "fr",
    }


def _classified_event(ctx: ExecutionContext) -> list[Emitted]:
    return [
        Emitted(
            "support.ticket.classified",
            {
                "ticket_id": ctx.bindings["ticket"]["ticket_id"],
                "category": ctx.bindings["classification"]["category"],
                "confidence": ctx.bindings["classification"]["confidence"],
                "summary": "Kunde fragt nach Rückerstattung — 返金の依頼 🙏",
                "assignee": None,
                "routing": {"team": "billing-emea", "escalation": None},
            },
        )
    ]


def _draft(ctx: ExecutionContext) -> dict[str, Any]:
    category = ctx.bindings["classification"]["category"]
    return {
        "model": "openai/gpt-4o",
        "text": f"Bonjour, merci pour votre message concernant {category}. "
        "Nous avons remboursé le double prélèvement.",
        "usage": {
            "prompt_tokens": 412,
            "completion_tokens": 96 + ctx.rng.randint(0, 40),
        },
    }


def _review_message(ctx: ExecutionContext) -> str:
    ticket = ctx.bindings["ticket"]
    return f"Check the drafted reply to {ticket['ticket_id']} « {ticket['subject']} »."


def _delivery(ctx: ExecutionContext) -> dict[str, Any]:
    return {
        "queue": "support-outbound",
        "message_id": f"msg_{ctx.rng.getrandbits(48):012x}",
        "sent": ctx.bindings.get("review", {}).get("resolution") != "reject",
    }


def _queue_completed_event(ctx: ExecutionContext) -> list[Emitted]:
    return [
        Emitted(
            "scaiqueue.message.completed",
            {
                "queue_slug": "support-outbound",
                "message_id": ctx.bindings["delivery"]["message_id"],
                "attempts": 1,
                "result": {"status": "delivered", "error": None},
            },
            from_node=False,
        )
    ]


def _triage_output(ctx: ExecutionContext) -> dict[str, Any]:
    review = ctx.bindings.get("review")
    return {
        "ticket_id": ctx.bindings["ticket"]["ticket_id"],
        "category": ctx.bindings["classification"]["category"],
        "reply": ctx.bindings["draft"]["text"],
        "review": review["resolution"] if review else None,
        "sent": ctx.bindings["delivery"]["sent"],
    }


SUPPORT_TRIAGE = CoreDefinition(
    core_id="core_support_triage",
    name="Support triage",
    description="Classify a support ticket, draft a reply, and send it.",
    source_file="flows/support_triage.scai",
    nodes=(
        Node("node_load_ticket", "rigid", "ticket", _ticket, duration_ms=8),
        Node(
            "node_classify",
            "flexible",
            "classification",
            _classification,
            duration_ms=240,
            emits=_classified_event,
        ),
        Node(
            "node_guard_pii",
            "guarded",
            "pii_check",
            lambda ctx: {"passed": True, "redactions": 0},
            duration_ms=15,
        ),
        Node("node_draft_reply", "model_call", "draft", _draft, duration_ms=380),
        Node(
            "node_review",
            "checkpoint",
            "review",
            when=lambda ctx: ctx.input.get("priority") == "high",
            checkpoint=CheckpointSpec(
                "hitl_review",
                ("approve", "reject"),
                title="Review needed",
                message=_review_message,
            ),
        ),
        Node(
            "node_send_reply",
            "rigid",
            "delivery",
            _delivery,
            duration_ms=20,
            emits=_queue_completed_event,
        ),
    ),
    output=_triage_output,
)


# --- core_invoice_review ---------------------------------------------------------


def _invoice(ctx: ExecutionContext) -> dict[str, Any]:
    return {
        "invoice_id": str(ctx.input.get("invoice_id", "INV-2026-0042")),
        "vendor": "Müller & Söhne GmbH, Zürich",
        "currency": "EUR",
        "amount": ctx.input.get("amount", 840),
    }


def _invoice_lines(ctx: ExecutionContext) -> list[dict[str, Any]]:
    # Sixty lines encode to well over 4 KB, so block.exited shows truncation.
    return [
        {
            "line": number,
            "sku": f"SKU-{1000 + number}",
            "description": "Schraube M4 × 20 mm, verzinkt",
            "quantity": ctx.rng.randint(1, 500),
            "unit_price_minor": ctx.rng.randint(5, 900),
        }
        for number in range(1, 61)
    ]


def _totals(ctx: ExecutionContext) -> dict[str, Any]:
    return {
        "line_count": len(ctx.bindings["lines"]),
        "total_minor_units": HUGE_TOTAL_MINOR_UNITS,
        "currency": "EUR",
        "note": "Σ über alle Positionen",
    }


def _totals_event(ctx: ExecutionContext) -> list[Emitted]:
    return [
        Emitted(
            "invoice.totals.checked",
            {
                "invoice_id": ctx.bindings["invoice"]["invoice_id"],
                "total_minor_units": HUGE_TOTAL_MINOR_UNITS,
                "vendor": ctx.bindings["invoice"]["vendor"],
                "flags": [],
                "reviewer": None,
            },
        )
    ]


def _invoice_output(ctx: ExecutionContext) -> dict[str, Any]:
    approval = ctx.bindings.get("approval")
    return {
        "invoice_id": ctx.bindings["invoice"]["invoice_id"],
        "approved": approval is None or approval["resolution"] == "approve",
        "total_minor_units": HUGE_TOTAL_MINOR_UNITS,
        "booking": ctx.bindings["booking"],
    }


INVOICE_REVIEW = CoreDefinition(
    core_id="core_invoice_review",
    name="Invoice review",
    description="Extract invoice lines, check totals and fraud signals, then book.",
    source_file="flows/invoice_review.scai",
    nodes=(
        Node("node_fetch_invoice", "rigid", "invoice", _invoice, duration_ms=30),
        Node("node_extract_lines", "foreach", "lines", _invoice_lines, duration_ms=610),
        Node(
            "node_check_totals",
            "rigid",
            "totals",
            _totals,
            duration_ms=4,
            emits=_totals_event,
        ),
        Node(
            "node_fraud_checks",
            "parallel",
            "fraud",
            lambda ctx: {"vendor_known": True, "anomaly_score": 0.07},
            duration_ms=290,
            children=(
                Node(
                    "node_vendor_lookup",
                    "rigid",
                    "vendor_record",
                    lambda ctx: {"vendor_id": "ven_4711", "since": "2019-03-01"},
                    duration_ms=25,
                ),
                Node(
                    "node_anomaly_score",
                    "model_call",
                    "anomaly",
                    lambda ctx: {"model": "anthropic/claude-3-5-sonnet", "score": 0.07},
                    duration_ms=270,
                ),
            ),
        ),
        Node(
            "node_approval",
            "checkpoint",
            "approval",
            when=lambda ctx: _number(ctx.input.get("amount")) > 10_000,
            checkpoint=CheckpointSpec(
                "hitl_review",
                ("approve", "reject"),
                title="Approve large invoice",
                message=lambda ctx: (
                    f"{ctx.bindings['invoice']['vendor']} billed "
                    f"{ctx.bindings['invoice']['amount']} EUR."
                ),
            ),
        ),
        Node(
            "node_book",
            "guarded",
            "booking",
            lambda ctx: {
                "booked": ctx.bindings.get("approval", {}).get("resolution")
                != "reject",
                "ledger_entry": f"LE-{ctx.rng.randint(100000, 999999)}",
            },
            duration_ms=40,
        ),
    ),
    output=_invoice_output,
)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


# --- core_debug_demo -------------------------------------------------------------

DEBUG_DEMO = CoreDefinition(
    core_id="core_debug_demo",
    name="Debugger demo",
    description="Counts in a loop and stops at a breakpoint before finishing.",
    source_file="flows/debug_demo.scai",
    nodes=(
        Node("node_start", "rigid", "counter", lambda ctx: 0, duration_ms=1),
        Node(
            "node_loop",
            "while",
            "counter",
            lambda ctx: 3,
            duration_ms=6,
            children=(
                Node(
                    "node_increment",
                    "rigid",
                    "step",
                    lambda ctx: {"by": 1},
                    duration_ms=1,
                ),
            ),
        ),
        Node(
            "node_breakpoint",
            "checkpoint",
            "breakpoint",
            checkpoint=CheckpointSpec(
                "debug_breakpoint",
                ("continue",),
                prompt="Paused at node_breakpoint with counter = 3. Continue?",
            ),
        ),
        Node(
            "node_finish",
            "rigid",
            "result",
            lambda ctx: {"counter": ctx.bindings["counter"], "message": "fertig ✅"},
            duration_ms=1,
        ),
    ),
    output=lambda ctx: ctx.bindings["result"],
)


# --- core_flaky ------------------------------------------------------------------


def _vendor_failure(ctx: ExecutionContext) -> dict[str, Any] | None:
    if ctx.input.get("succeed") is True:
        return None
    return {
        "type": "ModelTimeout",
        "message": "The model provider did not respond within 30 s.",
        "retryable": True,
    }


FLAKY = CoreDefinition(
    core_id="core_flaky",
    name="Flaky vendor call",
    description='Fails at node_call_vendor unless the input has "succeed": true.',
    source_file="flows/flaky.scai",
    nodes=(
        Node(
            "node_prepare",
            "rigid",
            "request",
            lambda ctx: {"vendor": "acme-ocr", "payload_bytes": 2048},
            duration_ms=3,
        ),
        Node(
            "node_call_vendor",
            "model_call",
            "vendor_response",
            lambda ctx: {"status": "ok"},
            duration_ms=1200,
            fails=_vendor_failure,
        ),
        Node(
            "node_store",
            "rigid",
            "stored",
            lambda ctx: {"stored": True},
            duration_ms=9,
        ),
    ),
    output=lambda ctx: {"stored": ctx.bindings["stored"]["stored"]},
)


# --- core_order_routing ----------------------------------------------------------


def _order(ctx: ExecutionContext) -> dict[str, Any]:
    return {
        "order_id": str(ctx.input.get("order_id", "SO-77812")),
        "destination": str(ctx.input.get("destination", "Kraków, Polska")),
        "weight_kg": ctx.input.get("weight_kg", 12.5),
    }


def _dispatch_events(ctx: ExecutionContext) -> list[Emitted]:
    return [
        Emitted(
            "logistics.order.routed",
            {
                "order_id": ctx.bindings["order"]["order_id"],
                "warehouse": ctx.bindings["warehouse"],
                "carrier": ctx.bindings["quotes"]["chosen"],
            },
        ),
        Emitted(
            "scaiqueue.message.completed",
            {
                "queue_slug": "dispatch",
                "message_id": ctx.bindings["dispatch"]["message_id"],
                "attempts": 2,
                "result": {"status": "delivered", "error": None},
            },
            from_node=False,
        ),
    ]


ORDER_ROUTING = CoreDefinition(
    core_id="core_order_routing",
    name="Order routing",
    description="Pick a warehouse and a carrier for an order and dispatch it.",
    source_file="flows/order_routing.scai",
    mode="entity",
    nodes=(
        Node("node_parse_order", "rigid", "order", _order, duration_ms=5),
        Node(
            "node_pick_warehouse",
            "while",
            "warehouse",
            lambda ctx: "WH-ŁÓDŹ-2",
            duration_ms=45,
            children=(
                Node(
                    "node_probe_warehouse",
                    "rigid",
                    "probe",
                    lambda ctx: {"stock_ok": True},
                    duration_ms=10,
                ),
            ),
        ),
        Node(
            "node_quote_carriers",
            "parallel",
            "quotes",
            lambda ctx: {"chosen": "dhl", "quotes": {"dhl": 1890, "ups": 2140}},
            duration_ms=320,
            children=(
                Node(
                    "node_quote_dhl",
                    "model_call",
                    "quote_dhl",
                    lambda ctx: 1890,
                    duration_ms=300,
                ),
                Node("node_quote_ups", "rigid", "quote_ups", lambda ctx: 2140),
            ),
        ),
        Node(
            "node_dispatch",
            "rigid",
            "dispatch",
            lambda ctx: {"message_id": f"msg_{ctx.rng.getrandbits(48):012x}"},
            duration_ms=12,
            emits=_dispatch_events,
        ),
    ),
    output=lambda ctx: {
        "order_id": ctx.bindings["order"]["order_id"],
        "warehouse": ctx.bindings["warehouse"],
        "carrier": ctx.bindings["quotes"]["chosen"],
    },
)


#: Cores of the seeded tenants. Any other tenant gets ``DEFAULT_CORES``.
TENANT_CORES: dict[str, tuple[CoreDefinition, ...]] = {
    "acme": (SUPPORT_TRIAGE, INVOICE_REVIEW, DEBUG_DEMO, FLAKY),
    "globex": (ORDER_ROUTING, INVOICE_REVIEW, DEBUG_DEMO, FLAKY),
}
DEFAULT_CORES = TENANT_CORES["acme"]
