"""Canned ScaiGrid bodies, the signing key and the caller's token for the benchmark.

Everything is generated from a fixed seed, so two runs serve the same bytes.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://scaikey.bench/platform"
AUDIENCE = "scaiproxy-bench"
TENANT_ID = "bench-tenant"
KEY_ID = "bench-rsa-1"
#: The tenant's ScaiGrid key that both proxies send upstream.
API_KEY = "sgk_bench0123456789abcdefghijklmnopqrstuv"
#: Page sizes served by the upstream; the query's ``limit`` picks the file.
PAGE_SIZES = (1, 50, 500)

_RUNTIME = "scaicore.runtime."
_BLOCK_KINDS = (
    "rigid",
    "flexible",
    "guarded",
    "model_call",
    "parallel",
    "checkpoint",
    "foreach",
    "while",
)
_MODELS = (
    ("openai/gpt-4o", "GPT-4o", "chat", 128000, 16384),
    ("openai/gpt-4o-mini", "GPT-4o mini", "chat", 128000, 16384),
    ("anthropic/claude-sonnet", "Claude Sonnet", "chat", 200000, 8192),
    ("mistral/mistral-large", "Mistral Large", "chat", 128000, 8192),
    ("meta/llama-3.1-70b", "Llama 3.1 70B", "chat", 131072, 4096),
    ("openai/text-embedding-3-small", "Embedding 3 small", "embedding", 8191, None),
    ("openai/whisper-1", "Whisper", "audio", None, None),
    ("stability/sdxl", "Stable Diffusion XL", "image", None, None),
)


@dataclass(frozen=True)
class Credentials:
    """The benchmark's RSA signing key, its JWKS document and a caller token."""

    jwks: dict[str, Any]
    token: str


def make_credentials(ttl_s: int = 3600) -> Credentials:
    """Generate an RSA key and mint an RS256 token the gateway accepts."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    public.update({"kid": KEY_ID, "use": "sig", "alg": "RS256"})
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "bench-user",
        "tenant_id": TENANT_ID,
        "permissions": ["scaicore:view"],
        "iat": now,
        "exp": now + ttl_s,
    }
    token = jwt.encode(claims, private_key, algorithm="RS256", headers={"kid": KEY_ID})
    return Credentials(jwks={"keys": [public]}, token=token)


def _timestamp(base: float, offset_ms: int) -> str:
    seconds = base + offset_ms / 1000
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{int(seconds * 1000) % 1000:03d}Z"


def _execution_payloads(rng: random.Random, number: int) -> list[tuple[str, dict]]:
    """Return the events of one invocation: started, node events, then the end."""
    execution_id = f"exec_{rng.getrandbits(64):016x}"
    instance_key = f"customer-{rng.randint(1000, 9999)}" if rng.random() < 0.5 else None
    started: dict[str, Any] = {
        "execution_id": execution_id,
        "node_id": None,
        "input": {
            "ticket_id": f"T-{number:05d}",
            "subject": f"Invoice discrepancy for order ORD-{rng.randint(10**5, 10**6)}",
            "priority": rng.choice(["low", "normal", "high"]),
            "language": rng.choice(["en", "de", "fr"]),
        },
    }
    if instance_key:
        started["instance_key"] = instance_key
    events = [(_RUNTIME + "invocation.started", started)]

    failed = rng.random() < 1 / 6
    total_ms = 0
    for index in range(rng.randint(2, 4)):
        node_id = f"node_{index + 1}"
        kind = rng.choice(_BLOCK_KINDS)
        block = {
            "execution_id": execution_id,
            "node_id": node_id,
            "block_kind": kind,
            "block_label": f"{kind.replace('_', ' ').title()} step {index + 1}",
            "attempt": 1,
        }
        events.append((_RUNTIME + "block.entered", dict(block)))
        duration = rng.randint(3, 1800)
        total_ms += duration
        if failed and index == 1:
            events.append(
                (
                    _RUNTIME + "block.failed",
                    {
                        **block,
                        "error": {
                            "type": "ModelCallError",
                            "message": "upstream model timed out after 30 s",
                            "retryable": True,
                        },
                        "duration_ms": duration,
                    },
                )
            )
            events.append(
                (
                    _RUNTIME + "invocation.failed",
                    {
                        "execution_id": execution_id,
                        "error": {
                            "type": "ModelCallError",
                            "message": "block node_2 failed: upstream model timed out",
                            "node_id": node_id,
                        },
                        "duration_ms": total_ms,
                    },
                )
            )
            return events
        events.append(
            (
                _RUNTIME + "block.exited",
                {
                    **block,
                    "result_binding": f"step_{index + 1}",
                    "result_binding_value": {
                        "label": rng.choice(["billing", "shipping", "refund", "other"]),
                        "confidence": round(rng.random(), 4),
                        "summary": "Customer reports a charge that does not match "
                        "the quoted price; wants a corrected invoice.",
                    },
                    "duration_ms": duration,
                },
            )
        )
    completed: dict[str, Any] = {
        "execution_id": execution_id,
        "output": {
            "route": "billing",
            "reply_draft": "Grüße, we corrected the invoice.",
        },
        "duration_ms": total_ms,
    }
    if instance_key:
        completed["instance_key"] = instance_key
    events.append((_RUNTIME + "invocation.completed", completed))
    return events


def make_events(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Return ``count`` runtime events of consecutive invocations, oldest first."""
    rng = random.Random(seed)
    base = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    events: list[dict[str, Any]] = []
    number = 0
    while len(events) < count:
        number += 1
        core_id = f"core_{rng.choice(['triage', 'refunds', 'onboarding'])}"
        for event_type, payload in _execution_payloads(rng, number):
            offset_ms = len(events) * 137
            events.append(
                {
                    "id": f"evt_{rng.getrandbits(80):020x}",
                    "type": event_type,
                    "core_id": core_id,
                    "tenant_id": TENANT_ID,
                    "sequence": 100_000 + len(events),
                    "timestamp": _timestamp(base, offset_ms),
                    "core_version": 3,
                    "trace_id": f"{rng.getrandbits(128):032x}",
                    "span_id": f"{rng.getrandbits(64):016x}",
                    "payload": payload,
                }
            )
    return events[:count]


def events_page(count: int) -> bytes:
    """Encode one ScaiGrid events page ``{"data": {"events", "next_cursor"}}``."""
    events = make_events(count)
    cursor = f"c2VxOjEwMDAwMDox{count:04d}+/=="
    body = {"data": {"events": events, "next_cursor": cursor}}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def models_list() -> bytes:
    """Encode ScaiGrid's native model list ``{"data": [...]}``."""
    items = []
    for slug, name, modality, context, max_output in _MODELS:
        item: dict[str, Any] = {
            "slug": slug,
            "display_name": name,
            "modality": modality,
            "context_window": context,
            "provider": slug.split("/")[0],
            "status": "active",
        }
        if max_output is not None:
            item["max_output_tokens"] = max_output
        items.append(item)
    return json.dumps({"data": items}, separators=(",", ":")).encode()


def write_upstream_files(root: Path, credentials: Credentials) -> dict[str, int]:
    """Write the upstream's files into ``root``; returns each file's size in bytes."""
    root.mkdir(parents=True, exist_ok=True)
    files = {f"events-{size}.json": events_page(size) for size in PAGE_SIZES}
    files["models.json"] = models_list()
    files["jwks.json"] = json.dumps(credentials.jwks).encode()
    sizes = {}
    for name, body in files.items():
        path = root / name
        path.write_bytes(body)
        path.chmod(0o644)
        sizes[name] = len(body)
    return sizes
