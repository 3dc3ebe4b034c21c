"""Encryption of tokens at rest (Fernet: AES-128-CBC + HMAC-SHA256, from ``cryptography``).

Theory of operation
-------------------
The Fernet key is derived with scrypt from one secret string: ``TRIOPROXY_SECRET_KEY`` when set,
otherwise the content of ``DATA_DIR/secret.key``, generated on first use with mode 0600. Both
paths go through the same derivation, so the content of ``secret.key`` can later be moved into
``TRIOPROXY_SECRET_KEY`` (for several replicas, which must all share one key).

A ``key_check`` ciphertext in the ``meta`` table, written when a store is first opened, tells
at open time whether the key is the one the tokens were encrypted with; a wrong key is a
:class:`StoreError` naming the key's source, not a decryption failure at the first request.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
import time
from pathlib import Path

import attrs
import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from trioproxy.store import schema
from trioproxy.store.records import StoreError

KEY_FILE_NAME = "secret.key"
_APP_SALT = b"trioproxy/token-encryption/v1"
_KEY_CHECK_PLAINTEXT = b"trioproxy key check v1"


def derive_fernet_key(secret: str) -> bytes:
    """A Fernet key from any secret string (scrypt, fixed application salt)."""
    kdf = Scrypt(salt=_APP_SALT, length=32, n=2**14, r=8, p=1)
    return base64.urlsafe_b64encode(kdf.derive(secret.encode("utf-8")))


def load_or_create_key_file(data_dir: Path) -> str:
    """The secret in ``data_dir/secret.key``, generated (mode 0600) if the file is missing.

    Error handling: a key file that group or others may read, or that stays empty, is a
    :class:`StoreError` saying how to fix it.
    """
    path = data_dir / KEY_FILE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise StoreError(
            f"{path} is accessible to other users (mode {mode:04o}); "
            f"restrict it with: chmod 600 {path}"
        )
    # Another process may have created the file an instant ago and not written it yet.
    for _ in range(50):
        secret = path.read_text().strip()
        if secret:
            return secret
        time.sleep(0.02)
    raise StoreError(f"{path} is empty; delete it only if the store holds no accounts yet")


@attrs.define(eq=False, repr=False)
class TokenCipher:
    """Encrypts and decrypts token strings; ``source`` says where the key came from."""

    _fernet: Fernet
    source: str

    @classmethod
    def from_settings(cls, secret_key: str, data_dir: Path) -> TokenCipher:
        if secret_key:
            return cls(Fernet(derive_fernet_key(secret_key)), "the configured secret key")
        secret = load_or_create_key_file(data_dir)
        return cls(Fernet(derive_fernet_key(secret)), f"the key file {data_dir / KEY_FILE_NAME}")

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, ciphertext: str, *, what: str) -> str:
        """Decrypt; a failure is a :class:`StoreError` naming ``what`` (never the data)."""
        try:
            return self._fernet.decrypt(ciphertext.encode("ascii")).decode("utf-8")
        except (InvalidToken, ValueError):
            raise StoreError(
                f"cannot decrypt {what} with {self.source}: the store was written with "
                "another secret key"
            ) from None

    def key_check(self) -> str:
        return self.encrypt(_KEY_CHECK_PLAINTEXT.decode())

    def matches(self, key_check: str) -> bool:
        try:
            return self._fernet.decrypt(key_check.encode("ascii")) == _KEY_CHECK_PLAINTEXT
        except (InvalidToken, ValueError):
            return False

    def check_store(self, conn: sa.Connection, url: str) -> None:
        """Record this key's check value in a new store; refuse a store written with another
        key (:class:`StoreError` naming both ends)."""
        m = schema.meta
        check = conn.execute(
            sa.select(m.c.value_text).where(m.c.name == "key_check")
        ).scalar_one_or_none()
        if check is None:
            conn.execute(m.insert().values(name="key_check", value_text=self.key_check()))
        elif not self.matches(check):
            raise StoreError(
                f"the store at {url} was encrypted with a different secret key than "
                f"{self.source}; use the original key (TRIOPROXY_SECRET_KEY / --secret-key, "
                "or the original DATA_DIR/secret.key) or point trioproxy at a new database"
            )
