"""What the mock's auth server remembers between the calls of a login (``login.py``):
device codes, authorize requests waiting for the mock user, and authorization codes waiting
to be exchanged. Plain values, no I/O."""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any
from urllib.parse import urlencode

import attrs

from trioproxy.harness.mock_upstream.accounts import MockAccount

CODE_TTL = 600.0  # an authorization code must be exchanged within this
DEVICE_CALLBACK_PATH = "/deviceauth/callback"


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of ``verifier``."""
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@attrs.define(eq=False)
class DeviceCode:
    device_auth_id: str
    user_code: str
    expires_at: float
    interval: int
    status: str = "pending"  # pending | approved | denied
    account_id: str | None = None
    last_poll: float | None = None

    def view(self) -> dict[str, Any]:
        return {
            "device_auth_id": self.device_auth_id,
            "user_code": self.user_code,
            "status": self.status,
            "interval": self.interval,
            "expires_at": self.expires_at,
        }


@attrs.define(eq=False)
class AuthorizeRequest:
    state: str
    redirect_uri: str
    code_challenge: str
    scope: str
    params: dict[str, str]
    status: str = "pending"  # pending | approved | denied
    account_id: str | None = None
    code: str | None = None

    def redirect(self) -> str:
        """Where the browser goes once the user has answered."""
        if self.status == "denied":
            query = {"error": "access_denied", "error_description": "The user denied access."}
        else:
            assert self.code is not None
            query = {"code": self.code}
        return f"{self.redirect_uri}?{urlencode({**query, 'state': self.state})}"

    def view(self) -> dict[str, Any]:
        return {"state": self.state, "status": self.status, "redirect_uri": self.redirect_uri}


@attrs.define(eq=False)
class AuthCode:
    account_id: str
    redirect_uri: str  # a device code's: any URI whose path is DEVICE_CALLBACK_PATH
    code_challenge: str
    expires_at: float
    device: bool = False


@attrs.define(eq=False)
class LoginBook:
    """Device codes, authorize requests and authorization codes waiting to be used."""

    devices: dict[str, DeviceCode] = attrs.field(factory=dict)  # by device_auth_id
    authorizes: dict[str, AuthorizeRequest] = attrs.field(factory=dict)  # by state
    codes: dict[str, AuthCode] = attrs.field(factory=dict)
    exchanges: int = 0  # successful code exchanges

    def new_code(
        self,
        account_id: str,
        redirect_uri: str,
        challenge: str,
        now: float,
        *,
        device: bool = False,
    ) -> str:
        code = f"ac_{secrets.token_urlsafe(24)}"
        self.codes[code] = AuthCode(account_id, redirect_uri, challenge, now + CODE_TTL, device)
        return code

    def answer(
        self, spec: dict[str, Any], account: MockAccount | None, *, approve: bool, now: float
    ) -> dict[str, Any]:
        """The mock user approves (as ``account``) or denies the device code of
        ``spec["user_code"]`` or the authorize request of ``spec["state"]``; ``ValueError``
        if there is no such pending one."""
        status = "approved" if approve else "denied"
        account_id = account.account_id if account is not None else None
        if "user_code" in spec:
            wanted = str(spec["user_code"]).upper()
            device = next((d for d in self.devices.values() if d.user_code == wanted), None)
            if device is None or device.status != "pending":
                raise ValueError(f"no pending device code {wanted}")
            device.status, device.account_id = status, account_id
            return {"device_auth_id": device.device_auth_id, "status": status}
        request = self.authorizes.get(str(spec.get("state")))
        if request is None or request.status != "pending":
            raise ValueError("no pending authorize request with that state")
        request.status, request.account_id = status, account_id
        if approve:
            assert account_id is not None
            request.code = self.new_code(
                account_id, request.redirect_uri, request.code_challenge, now
            )
        return {"state": request.state, "status": status, "redirect_url": request.redirect()}

    def view(self) -> dict[str, Any]:
        return {
            "devices": [d.view() for d in self.devices.values()],
            "authorizes": [a.view() for a in self.authorizes.values()],
            "exchanges": self.exchanges,
        }
