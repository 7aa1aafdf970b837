"""How hidden states travel between a router and the expert actors: a registry of transports.

Every module of this package is imported here, so a transport registers itself by defining a
subclass of `ExpertTransport` with a `name`: adding one is one new file (see the README).
"""

import importlib
import pkgutil

from .base import (
    TRANSPORTS,
    ExpertReply,
    ExpertTransport,
    InFlight,
    Messages,
    TransportName,
    TransportSettings,
    transport_names,
)
from .remote_experts import RemoteExperts

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "TRANSPORTS", "ExpertReply", "ExpertTransport", "InFlight", "Messages", "RemoteExperts", "TransportName",
    "TransportSettings",
    "transport_names",
]  # fmt: skip
