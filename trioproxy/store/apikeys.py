"""Client API key format: ``trx_<key_id>_<secret>``.

``key_id`` (8 hex digits) is public: it names the key in listings and selects the stored row.
The secret carries 256 random bits, so a SHA-256 of the whole key is stored (no password
stretching needed) and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

API_KEY_PREFIX = "trx"
_KEY_ID_RE = re.compile(r"[0-9a-f]{8}")
_DUMMY_HASH = hashlib.sha256(b"trioproxy: no such key").hexdigest()


def new_api_key() -> tuple[str, str]:
    """A fresh ``(key_id, plaintext)``."""
    key_id = secrets.token_hex(4)
    return key_id, new_secret(key_id)


def new_secret(key_id: str) -> str:
    """A fresh plaintext for an existing ``key_id`` (rotation)."""
    return f"{API_KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def hash_api_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8", "replace")).hexdigest()


def key_id_of(presented: str) -> str | None:
    """The key id of something shaped like a key (``trx_<id>_...``; ``trx_<id>`` too)."""
    parts = presented.split("_", 2)
    if len(parts) >= 2 and parts[0] == API_KEY_PREFIX and _KEY_ID_RE.fullmatch(parts[1]):
        return parts[1]
    return None


def hash_matches(presented: str, stored_hash: str | None) -> bool:
    """Constant-time check of ``presented`` against a stored hash (None: no such key, and
    the same work is done so that timing does not tell the two apart)."""
    digest = hash_api_key(presented)
    if stored_hash is None:
        hmac.compare_digest(digest, _DUMMY_HASH)
        return False
    return hmac.compare_digest(digest, stored_hash)
