"""API keys: ``Authorization: Bearer <key>`` mapped to a tenant name, compared in constant time.

Keys come from a file (``--api-key-file``) and/or the ``INFERD_API_KEYS`` environment variable, in
one format: ``tenant:key`` entries, one per line in the file (``#`` comments and blank lines
skipped), separated by newlines or commas in the variable. Only SHA-256 digests of the keys are
kept; no key is ever written to a log or an error message. The file is re-read when it changes
(checked at most once a second), so keys rotate without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time

log = logging.getLogger(__name__)

ENV = "INFERD_API_KEYS"
# tenants become metric label values and log words: a short plain name
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MIN_KEY = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse(text: str, source: str) -> list[tuple[str, bytes]]:
    """(tenant, digest) pairs; a bad entry names its line (never its key)."""
    entries: list[tuple[str, bytes]] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(re.split(r"[\n,]", text) if source == ENV else text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} entry {number}" if source == ENV else f"{source} line {number}"
        tenant, sep, key = line.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not key:
            raise ValueError(f"{where}: expected 'tenant:key'")
        if not _TENANT.fullmatch(tenant):
            raise ValueError(f"{where}: the tenant name must be 1-64 of A-Z a-z 0-9 _ . - "
                             "starting with a letter or digit")
        if len(key) < _MIN_KEY or any(c.isspace() for c in key):
            raise ValueError(f"{where}: the key of tenant '{tenant}' must be at least {_MIN_KEY} "
                             "characters without spaces")
        digest = _digest(key)
        if digest in seen:
            raise ValueError(f"{where}: the key of tenant '{tenant}' is listed twice")
        seen.add(digest)
        entries.append((tenant, digest))
    return entries


class ApiKeys:
    """The key table. ``tenant(header)`` is the caller's tenant, or None when the header does not
    carry a listed key."""

    def __init__(self, path: str = "", env_text: str = "") -> None:
        self.path = path
        self._env = parse(env_text, ENV) if env_text else []
        self._file: list[tuple[str, bytes]] = []
        self._signature: tuple[int, int, int] | None = None
        self._checked = 0.0
        if path:
            self._file = parse(self._read(), path)
        if not self._env and not self._file:
            raise ValueError(f"no API keys in {path or ENV}")
        self._entries = self._env + self._file

    @classmethod
    def from_settings(cls, path: str) -> ApiKeys | None:
        env_text = os.environ.get(ENV, "")
        if not path and not env_text.strip():
            return None
        return cls(path, env_text)

    def tenants(self) -> list[str]:
        return sorted({tenant for tenant, _ in self._entries})

    def _read(self) -> str:
        st = os.stat(self.path)
        self._signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if not self.path or now - self._checked < 1.0:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            if (st.st_ino, st.st_mtime_ns, st.st_size) == self._signature:
                return
            entries = parse(self._read(), self.path)
        except (OSError, ValueError) as exc:
            log.warning("API key file changed but cannot be used (%s); keeping the previous keys", exc)
            return
        self._file = entries
        self._entries = self._env + entries
        log.info("API key file reloaded: %d keys for tenants %s", len(self._entries),
                 ", ".join(self.tenants()))

    def tenant(self, authorization: str | None) -> str | None:
        self._maybe_reload()
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = _digest(key.strip())
        found = None
        for tenant, known in self._entries:  # every entry compared: the time does not say which
            if hmac.compare_digest(digest, known):
                found = tenant
        return found
