"""API keys: which keys are valid, and who owns a request (a digest of its key, never the key)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os

from .errors import unauthorized

API_KEYS_ENV = "MOERAY_API_KEYS"  # comma-separated
ALL_INTERFACES = "[::]"  # where Serve's gRPC proxy listens, whatever the HTTP host


class OpenExposure(RuntimeError):
    """Serving without an API key on an address other machines can reach, not explicitly allowed."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def serve_listeners() -> list[str]:
    """The addresses the running Serve instance listens on: its HTTP host, and every interface when its
    gRPC proxy is on. Before Serve runs, what `serve.run` would start: HTTP on 127.0.0.1 only."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False) if ray.is_initialized() else None
    if client is None:
        return ["127.0.0.1"]
    grpc = ray.get(client._controller.get_grpc_config.remote())
    return [client.http_config.host] + ([ALL_INTERFACES] if grpc.grpc_servicer_functions else [])


def refuse_open_exposure(*hosts: str) -> None:
    """Raise OpenExposure when any host is not loopback (the caller has no API key)."""
    exposed = [host for host in hosts if not is_loopback(host)]
    if exposed:
        raise OpenExposure(
            f"refusing to serve without an API key on {', '.join(exposed)} (reachable from other machines"
            f"{'; Serve gRPC listens on every interface' if ALL_INTERFACES in exposed else ''}): set "
            f"{API_KEYS_ENV} or api_keys, or allow_unauthenticated: true to serve anyone who can connect"
        )


class KeyRing:
    """Valid API keys (from arguments and MOERAY_API_KEYS). Empty = no authentication.

    A request's owner is a digest of its key: sessions belong to the key that created them, and no
    key travels further than the ingress."""

    def __init__(self, keys: list[str] | str | None = None, read_env: bool = True, digests: list[str] = ()):
        if isinstance(keys, str):
            keys = keys.split(",")
        found = [k.strip() for k in (keys or []) if k and k.strip()]
        if read_env:
            found += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        self.digests = {self.owner_of(k) for k in found} | set(digests)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    @staticmethod
    def owner_of(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def check(self, key: str | None) -> str:
        """The owner of a valid key; raises a 401 otherwise. Without keys everyone is owner ""."""
        if not self.enabled:
            return ""
        if not key:
            raise unauthorized()
        digest = self.owner_of(key)
        if not any(hmac.compare_digest(digest, valid) for valid in self.digests):
            raise unauthorized()
        return digest

    @staticmethod
    def key_from_headers(headers: dict[str, str]) -> str | None:
        """`Authorization: Bearer <key>` (what OpenAI clients send) or `X-Api-Key: <key>`."""
        authorization = headers.get("authorization", "")
        if authorization[:7].lower() == "bearer ":
            return authorization[7:].strip()
        return headers.get("x-api-key") or None
