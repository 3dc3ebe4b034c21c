"""Admin passwords: salted scrypt hashes (sans-IO; the callers run :func:`hash_password` and
:func:`verify_password` in a worker thread, each costs about 0.1 to 0.3 s of CPU and 32 MiB).

A hash is stored as ``scrypt$N$r$p$salt$hash`` (salt and hash in URL-safe base64 without
padding), so the cost can be raised later and old hashes still verify with theirs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SCHEME = "scrypt"
#: scrypt's cost: N = 2**15, r = 8 (32 MiB of memory per hash), p = 1
COST_N = 2**15
BLOCK_R = 8
PARALLEL_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_MEMORY = 64 * 1024 * 1024
#: a password an operator chooses must be at least this long
MIN_LENGTH = 10
#: a password made by :func:`generate_password` (about 144 bits)
GENERATED_BYTES = 18


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate_password() -> str:
    """A random password, URL-safe characters only."""
    return secrets.token_urlsafe(GENERATED_BYTES)


def check_new_password(password: str) -> str | None:
    """Why ``password`` cannot be an admin's password, or None when it can."""
    if len(password) < MIN_LENGTH:
        return f"a password needs at least {MIN_LENGTH} characters"
    if password != password.strip():
        return "a password may not start or end with white space"
    return None


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The stored form of ``password``, with a new random salt."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=COST_N,
        r=BLOCK_R,
        p=PARALLEL_P,
        maxmem=MAX_MEMORY,
        dklen=HASH_BYTES,
    )
    return f"{SCHEME}${COST_N}${BLOCK_R}${PARALLEL_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` was made from (constant-time comparison).
    A stored value that cannot be read verifies nothing."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=MAX_MEMORY,
            dklen=len(expected),
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


#: verified against when a sign-in names no admin, so that such an attempt costs the same
#: time as a wrong password and does not tell which names exist
DECOY_HASH = f"{SCHEME}${COST_N}${BLOCK_R}${PARALLEL_P}${_b64(b'trioproxy-decoy!')}${_b64(bytes(HASH_BYTES))}"
