"""Settings of a simulator instance."""

from __future__ import annotations

from dataclasses import dataclass

#: Shapes that ``GET /v1/models`` can take, see :attr:`SimOptions.models_shape`.
MODELS_SHAPES = ("native", "items", "openai")
#: The maximum added latency: ten minutes, beyond any gateway timeout worth testing.
MAX_LATENCY_MS = 600_000
#: The maximum pause between background invocations: one day.
MAX_ACTIVITY_INTERVAL_S = 86_400


@dataclass
class SimOptions:
    """Settings of a simulator; the fault fields may be changed while it runs.

    Latency, error rate, rate limit and models shape are read on every request, so
    assigning to them (or ``POST /_sim/faults``) takes effect at once.
    """

    #: ``iss`` of minted tokens, and the only issuer the ScaiGrid routes accept.
    issuer: str = "http://scaikey.sim"
    #: ``aud`` of minted tokens, and the only audience the ScaiGrid routes accept.
    audience: str = "scaiflow-canvas"
    #: Delay in milliseconds added to every ScaiGrid request before it is handled.
    latency_ms: float = 0.0
    #: Fraction (0 to 1) of authenticated ScaiGrid requests that fail with a 500.
    error_rate: float = 0.0
    #: Maximum ScaiGrid requests per tenant per fixed 60 s window; None is no limit.
    rate_limit_per_minute: int | None = None
    #: Shape of ``GET /v1/models``: "native", "items" or "openai".
    models_shape: str = "native"
    #: Seconds between background invocations of demo cores; None disables them.
    activity_interval_s: float | None = None
    #: Seed of the random generator behind ids, demo keys and simulated data.
    seed: int = 7
    #: Bearer token that the ScaiVault stand-in accepts.
    vault_token: str = "dev-vault-token"

    def __post_init__(self) -> None:
        validate_faults(
            latency_ms=self.latency_ms,
            error_rate=self.error_rate,
            rate_limit_per_minute=self.rate_limit_per_minute,
            models_shape=self.models_shape,
        )
        if self.activity_interval_s is not None and not (
            0 < self.activity_interval_s <= MAX_ACTIVITY_INTERVAL_S
        ):
            raise ValueError(
                "activity_interval_s must be a number of seconds above 0 and at most "
                f"{MAX_ACTIVITY_INTERVAL_S}, or None, "
                f"got {self.activity_interval_s!r}"
            )


def validate_faults(
    *,
    latency_ms: float,
    error_rate: float,
    rate_limit_per_minute: int | None,
    models_shape: str,
) -> None:
    """Raise ValueError naming the first fault setting that is out of range."""
    if not 0 <= latency_ms <= MAX_LATENCY_MS:
        # Also rejects NaN, and infinity, which would hold every request forever.
        raise ValueError(
            f"latency_ms must be from 0 to {MAX_LATENCY_MS}, got {latency_ms!r}"
        )
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be between 0 and 1, got {error_rate!r}")
    if rate_limit_per_minute is not None and rate_limit_per_minute < 1:
        raise ValueError(
            "rate_limit_per_minute must be 1 or more, or None for no limit, "
            f"got {rate_limit_per_minute!r}"
        )
    if models_shape not in MODELS_SHAPES:
        raise ValueError(
            f"models_shape must be one of {', '.join(MODELS_SHAPES)}, "
            f"got {models_shape!r}"
        )
