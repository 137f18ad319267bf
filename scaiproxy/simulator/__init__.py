"""Simulated ScaiGrid, ScaiKey and ScaiVault for development, demos and tests.

One aiohttp app serves ScaiGrid's ScaiCore, ScaiQueue, ScaiBunker and model
routes with ScaiGrid's envelopes, a ScaiKey JWKS and development token route, a
ScaiVault secret store, and ``/_sim`` controls for faults and request logs. See
``docs/simulator.md``.
"""

from scaiproxy.simulator.cli import main
from scaiproxy.simulator.options import SimOptions
from scaiproxy.simulator.server import Simulator

__all__ = ["SimOptions", "Simulator", "main"]
