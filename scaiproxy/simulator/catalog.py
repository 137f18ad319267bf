"""Seeded catalogue data: queue scopes and queues, bunkers and models."""

from __future__ import annotations

import random
from typing import Any

# Scope slugs and display names per seeded tenant. Other tenants get acme's set.
_SCOPES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "acme": (
        ("support", "Support", "Inbound tickets and outbound replies."),
        ("billing", "Billing", "Invoices, refunds and dunning."),
        ("logistics", "Logistics", "Shipment updates from carriers."),
        ("marketing", "Marketing", "Campaign sends and bounces."),
        ("data-platform", "Data platform", "Nightly exports and backfills."),
        ("security", "Security", "Alerts from the SIEM."),
        ("research", "Recherche & Entwicklung", "Experiments, Übersetzungen, 実験."),
    ),
    "globex": (
        ("fulfilment", "Fulfilment", "Orders ready to pick and pack."),
        ("returns", "Returns", "Return requests and refunds."),
        ("procurement", "Procurement", "Purchase orders to suppliers."),
        ("hr", "People", "Onboarding and offboarding tasks."),
        ("finance", "Finance", "Ledger postings and reconciliations."),
        ("it-ops", "IT operations", "Patch windows and incidents."),
        ("lab", "Lab", "Prototype flows, not for production."),
    ),
}

_CONSUMER_MODES = ("competing", "fanout", "exclusive")

# Every lifecycle paired with every status, so that a client filtering for active
# bunkers meets each case once.
_BUNKER_STATUSES = (
    "running",
    "ready",
    "starting",
    "stopped",
    "destroyed",
    "failed",
    "terminated",
)
_BUNKER_IMAGES = (
    "registry.scaigrid.sim/bunkers/python:3.12",
    "registry.scaigrid.sim/bunkers/node:22",
    "registry.scaigrid.sim/bunkers/playwright:1.48",
)

#: The model catalogue in ScaiGrid's native shape. It is the same for every tenant.
NATIVE_MODELS: tuple[dict[str, Any], ...] = (
    {
        "slug": "openai/gpt-4o",
        "display_name": "GPT-4o",
        "modality": "chat",
        "context_window": 128000,
        "max_output_tokens": 16384,
    },
    {
        "slug": "anthropic/claude-3-5-sonnet",
        "display_name": "Claude 3.5 Sonnet",
        "modality": "chat",
        "context_window": 200000,
        "max_output_tokens": 8192,
    },
    {
        # No display_name: clients fall back to the slug.
        "slug": "meta/llama-3.1-70b-instruct",
        "modality": "chat",
        "context_window": 131072,
        "max_output_tokens": 4096,
    },
    {
        # No modality: clients fall back to "chat".
        "slug": "mistral/mistral-large",
        "display_name": "Mistral Large",
        "context_window": 128000,
        "max_output_tokens": 8192,
    },
    {
        # Embedding models have no output token limit.
        "slug": "openai/text-embedding-3-small",
        "display_name": "Text Embedding 3 Small",
        "modality": "embedding",
        "context_window": 8191,
    },
    {
        "slug": "scaigrid/whisper-large-v3",
        "display_name": "Whisper large-v3 (Übersetzung)",
        "modality": "audio",
        "context_window": 448,
        "max_output_tokens": 448,
    },
)

# Unix time of 2024-05-13, used as the OpenAI-style "created" of every model.
_MODELS_CREATED = 1715558400


def openai_models() -> dict[str, Any]:
    """Build the model list in the OpenAI shape, as ``/oai/v1/models`` returns it."""
    data = []
    for model in NATIVE_MODELS:
        entry: dict[str, Any] = {
            "id": model["slug"],
            "object": "model",
            "created": _MODELS_CREATED,
            "owned_by": model["slug"].split("/", 1)[0],
            "context_window": model["context_window"],
        }
        if "max_output_tokens" in model:
            entry["max_output_tokens"] = model["max_output_tokens"]
        data.append(entry)
    return {"object": "list", "data": data}


def tenant_rng(seed: int, tenant_id: str) -> random.Random:
    """Return a generator that gives each tenant its own, repeatable ids."""
    return random.Random(f"{seed}:{tenant_id}")


def build_scopes(
    tenant_id: str, rng: random.Random
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Return the tenant's scopes and the queues of each scope, keyed by scope id."""
    scopes: list[dict[str, Any]] = []
    queues: dict[str, list[dict[str, Any]]] = {}
    for index, (slug, display_name, description) in enumerate(
        _SCOPES.get(tenant_id, _SCOPES["acme"])
    ):
        scope_id = f"scope_{rng.getrandbits(64):016x}"
        scope_queues = [
            {
                "id": f"queue_{rng.getrandbits(64):016x}",
                "scope_id": scope_id,
                "slug": f"{slug}-{suffix}",
                "display_name": f"{display_name} – {suffix}",
                "consumer_mode": _CONSUMER_MODES[(index + number) % 3],
                "max_retries": (index + number) % 6,
                "dead_letter": number == 0,
            }
            for number, suffix in enumerate(
                ("inbound", "outbound", "retry")[: 1 + index % 3]
            )
        ]
        scopes.append(
            {
                "id": scope_id,
                "slug": slug,
                "display_name": display_name,
                "description": description,
                "queue_count": len(scope_queues),
                "created_at": f"2025-0{1 + index}-1{index}T08:30:00Z",
            }
        )
        queues[scope_id] = scope_queues
    return scopes, queues


def build_bunkers(tenant_id: str, rng: random.Random) -> list[dict[str, Any]]:
    """Return one bunker per lifecycle and status combination."""
    bunkers = []
    for lifecycle in ("ephemeral", "persistent"):
        for index, status in enumerate(_BUNKER_STATUSES):
            bunkers.append(
                {
                    "bunker_id": f"bnk_{rng.getrandbits(64):016x}",
                    "name": f"{tenant_id}-{lifecycle}-{status}",
                    "image_ref": _BUNKER_IMAGES[index % len(_BUNKER_IMAGES)],
                    "lifecycle": lifecycle,
                    "status": status,
                    "resources": {
                        "cpu": 1 + index % 4,
                        "memory_mb": 1024 * (1 + index % 3),
                    },
                    "created_at": f"2026-02-{10 + index:02d}T14:00:00Z",
                }
            )
    return bunkers
