"""API keys: which keys are valid, and who owns a request (a digest of its key, never the key)."""

from __future__ import annotations

import hashlib
import hmac
import os

from .errors import unauthorized

API_KEYS_ENV = "MOERAY_API_KEYS"  # comma-separated


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
