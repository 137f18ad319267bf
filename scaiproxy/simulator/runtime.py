"""Simulated ScaiCore runtime: walks a core's nodes and records its events.

Executions run synchronously inside the request that starts or resumes them, so
all of an execution's events exist by the time the response is sent. Durations
are simulated from each node's nominal cost, while timestamps are wall-clock time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from scaiproxy.simulator import errors
from scaiproxy.simulator.encoding import dumps
from scaiproxy.simulator.errors import SimError
from scaiproxy.simulator.flows import CoreDefinition, ExecutionContext, Node
from scaiproxy.simulator.state import PausedExecution, SimState, TenantState

#: Largest ``result_binding_value`` in a block.exited event, in bytes of JSON.
MAX_RESULT_BINDING_BYTES = 4096

_RUNTIME = "scaicore.runtime."


def iso_timestamp(seconds: float) -> str:
    """Format a Unix time as ISO 8601 in UTC with milliseconds and a ``Z``."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Runtime:
    """Invokes cores and resolves checkpoints against the tenants in ``state``."""

    def __init__(
        self,
        state: SimState,
        rng: random.Random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self._rng = rng
        self._clock = clock

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{self._rng.getrandbits(64):016x}"

    def now(self) -> str:
        return iso_timestamp(self._clock())

    def invoke(
        self,
        tenant_id: str,
        core_id: str,
        input: dict[str, Any],
        entity_id: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Run ``core_id`` for the tenant and return ScaiCore's InvokeResponse.

        ``status`` is ``completed``, ``failed`` or ``paused``; a paused response
        carries the ``checkpoint_id`` to resolve. Raises SimError 404 for a core
        the tenant does not have.
        """
        tenant = self.state.tenant(tenant_id)
        core = tenant.cores.get(core_id)
        if core is None:
            raise SimError(
                404,
                errors.CORE_NOT_FOUND,
                f"Core {core_id!r} not found in tenant {tenant_id!r}.",
            )

        execution_id = self.new_id("exec")
        context = ExecutionContext(
            execution_id=execution_id,
            core_id=core_id,
            input=input,
            instance_key=entity_id,
            rng=random.Random(execution_id),
        )
        started: dict[str, Any] = {
            "execution_id": execution_id,
            "node_id": None,
            "input": input,
        }
        if entity_id is not None:
            started["instance_key"] = entity_id
        self.record_event(tenant, core_id, _RUNTIME + "invocation.started", started)

        result = _Walk(self, tenant, core, context).run(start=0, elapsed_ms=0)
        return {
            "output": result.pop("output"),
            "request_id": request_id or self.new_id("req"),
            **result,
        }

    def resolve(
        self,
        tenant_id: str,
        checkpoint_id: str,
        resolution: str,
        comment: str | None = None,
        resolved_by: str | None = None,
    ) -> dict[str, Any]:
        """Resolve a pending checkpoint, resume its execution, return the checkpoint.

        Raises SimError 404 for an unknown checkpoint, 409 for one that is not
        pending, and 422 for a resolution that is not among its options.
        """
        tenant = self.state.tenant(tenant_id)
        record = tenant.checkpoints.get(checkpoint_id)
        if record is None:
            raise SimError(
                404,
                errors.CHECKPOINT_NOT_FOUND,
                f"Checkpoint {checkpoint_id!r} not found.",
            )
        checkpoint = record.body
        if checkpoint["status"] == "resolved":
            raise SimError(
                409,
                errors.CHECKPOINT_ALREADY_RESOLVED,
                f"Checkpoint {checkpoint_id!r} was already resolved "
                f"at {checkpoint['resolved_at']}.",
            )
        if checkpoint["status"] != "pending":
            raise SimError(
                409,
                errors.CHECKPOINT_NOT_PENDING,
                f"Checkpoint {checkpoint_id!r} is {checkpoint['status']}, "
                "so it can no longer be resolved.",
            )
        if resolution not in checkpoint["options"]:
            allowed = ", ".join(checkpoint["options"])
            raise errors.invalid_field("resolution", f"expected one of: {allowed}")

        checkpoint.update(
            status="resolved",
            resolved_at=self.now(),
            resolution=resolution,
            comment=comment,
            resolved_by=resolved_by,
        )
        paused = tenant.paused.pop(checkpoint["execution_id"], None)
        if paused is not None:
            self._resume(tenant, paused, resolution, comment)
        return dict(checkpoint)

    def _resume(
        self,
        tenant: TenantState,
        paused: PausedExecution,
        resolution: str,
        comment: str | None,
    ) -> None:
        walk = _Walk(self, tenant, paused.core, paused.context)
        node = paused.core.nodes[paused.node_index]
        walk.exit_node(node, {"resolution": resolution, "comment": comment})
        walk.run(start=paused.node_index + 1, elapsed_ms=paused.elapsed_ms)

    def record_event(
        self,
        tenant: TenantState,
        core_id: str,
        event_type: str,
        payload: dict[str, Any],
    ) -> None:
        tenant.append_event(
            {
                "id": self.new_id("evt"),
                "type": event_type,
                "core_id": core_id,
                "timestamp": self.now(),
                "payload": payload,
            }
        )


class _Walk:
    """One pass over a core's top-level nodes, from a start index to an end state."""

    def __init__(
        self,
        runtime: Runtime,
        tenant: TenantState,
        core: CoreDefinition,
        context: ExecutionContext,
    ) -> None:
        self._runtime = runtime
        self._tenant = tenant
        self._core = core
        self._context = context
        self._elapsed_ms = 0

    def run(self, start: int, elapsed_ms: int) -> dict[str, Any]:
        self._elapsed_ms = elapsed_ms
        nodes = self._core.nodes
        for index in range(start, len(nodes)):
            node = nodes[index]
            if node.when is not None and not node.when(self._context):
                continue
            self._enter_node(node)
            if node.checkpoint is not None:
                return self._pause(node, index)
            error = self._finish_node(node)
            if error is not None:
                return self._fail(error)
        return self._complete()

    def exit_node(self, node: Node, value: Any) -> None:
        """Bind ``value`` and record block.exited, then the node's own events."""
        if node.result_binding is not None:
            self._context.bindings[node.result_binding] = value
        self._elapsed_ms += node.duration_ms

        payload = self._block_payload(node)
        payload["result_binding"] = node.result_binding
        encoded = dumps(value)
        if len(encoded) <= MAX_RESULT_BINDING_BYTES:
            payload["result_binding_value"] = value
        else:
            payload["result_binding_truncated"] = True
            payload["result_binding_bytes"] = len(encoded)
        payload["duration_ms"] = node.duration_ms
        self._record(_RUNTIME + "block.exited", payload)

        if node.emits is not None:
            for emitted in node.emits(self._context):
                emitted_payload = {
                    "execution_id": self._context.execution_id,
                    "node_id": node.node_id if emitted.from_node else None,
                    **emitted.payload,
                }
                self._record(emitted.type, emitted_payload)

    def _enter_node(self, node: Node) -> None:
        self._record(_RUNTIME + "block.entered", self._block_payload(node))

    def _finish_node(self, node: Node) -> dict[str, Any] | None:
        """Run the children and the node itself; return the error if one failed."""
        for child in node.children:
            self._enter_node(child)
            error = self._finish_node(child)
            if error is not None:
                # The failure propagates, so the enclosing block fails as well.
                self._record_block_failed(node, error)
                return error

        error = node.fails(self._context) if node.fails is not None else None
        if error is not None:
            error = {**error, "node_id": node.node_id}
            self._elapsed_ms += node.duration_ms
            self._record_block_failed(node, error)
            return error

        self.exit_node(node, node.value(self._context))
        return None

    def _record_block_failed(self, node: Node, error: dict[str, Any]) -> None:
        payload = self._block_payload(node)
        payload["error"] = error
        self._record(_RUNTIME + "block.failed", payload)

    def _pause(self, node: Node, index: int) -> dict[str, Any]:
        spec = node.checkpoint
        assert spec is not None
        checkpoint: dict[str, Any] = {
            "id": self._runtime.new_id("ckpt"),
            "core_id": self._core.core_id,
            "execution_id": self._context.execution_id,
            "node_id": node.node_id,
            "checkpoint_type": spec.checkpoint_type,
            "status": "pending",
        }
        if spec.checkpoint_type == "debug_breakpoint":
            checkpoint["prompt"] = spec.prompt
        else:
            message = spec.message(self._context) if spec.message else ""
            checkpoint["presentation"] = {"title": spec.title, "message": message}
        checkpoint.update(
            options=list(spec.options),
            created_at=self._runtime.now(),
            resolved_at=None,
            resolution=None,
            comment=None,
            resolved_by=None,
        )
        self._tenant.add_checkpoint(checkpoint)
        self._tenant.paused[self._context.execution_id] = PausedExecution(
            core=self._core,
            context=self._context,
            node_index=index,
            checkpoint_id=checkpoint["id"],
            elapsed_ms=self._elapsed_ms,
        )
        return {
            "output": None,
            "duration_ms": self._elapsed_ms,
            "execution_id": self._context.execution_id,
            "status": "paused",
            "checkpoint_id": checkpoint["id"],
        }

    def _fail(self, error: dict[str, Any]) -> dict[str, Any]:
        self._record(
            _RUNTIME + "invocation.failed",
            {
                "execution_id": self._context.execution_id,
                "node_id": None,
                "error": error,
                "duration_ms": self._elapsed_ms,
            },
        )
        return {
            "output": None,
            "duration_ms": self._elapsed_ms,
            "execution_id": self._context.execution_id,
            "status": "failed",
            "error": error,
        }

    def _complete(self) -> dict[str, Any]:
        output = self._core.output(self._context)
        payload: dict[str, Any] = {
            "execution_id": self._context.execution_id,
            "node_id": None,
            "output": output,
            "duration_ms": self._elapsed_ms,
        }
        if self._context.instance_key is not None:
            payload["instance_key"] = self._context.instance_key
        self._record(_RUNTIME + "invocation.completed", payload)
        return {
            "output": output,
            "duration_ms": self._elapsed_ms,
            "execution_id": self._context.execution_id,
            "status": "completed",
        }

    def _block_payload(self, node: Node) -> dict[str, Any]:
        return {
            "execution_id": self._context.execution_id,
            "node_id": node.node_id,
            "block_kind": node.block_kind,
            "source_location": {
                "file": self._core.source_file,
                "line": self._core.source_lines[node.node_id],
                "node_id": node.node_id,
            },
        }

    def _record(self, event_type: str, payload: dict[str, Any]) -> None:
        self._runtime.record_event(
            self._tenant, self._core.core_id, event_type, payload
        )
