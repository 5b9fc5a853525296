"""Who is calling: users with hashed passwords, HMAC-signed access tokens, API keys, HTTP Basic.

One users file (YAML) serves every API shape:

    secret: "a long random string"   # HMAC key of the access tokens; shared by every replica
    token_ttl_s: 3600                # access token lifetime (per user `token_ttl_s` overrides it)
    users:
      alice:
        password_hash: "scrypt$16384$8$1$<salt b64>$<hash b64>"   # veil serve --hash-password
    api_keys:                        # Syntonym-style `x-api-key` (hashes only; keys are random)
      - {user: alice, key_hash: "sha256$<hex>", credits: 1000, auto_approve_below: 10}   # --hash-api-key

Celantur signs in with username/password and sends the token (`Authorization: <token>` or
`Bearer <token>`); FaceBlurest sends HTTP Basic; Syntonym sends `x-api-key`. Each API module turns an
`AuthError` into its own 401 shape. Nothing here logs or stores a secret; comparisons are
constant-time.

An API key's `credits` is its account's balance (absent: no limit; what each job charged is kept in
the storage, see credits.py) and `auto_approve_below` overrides the server's auto-approve limit for
its jobs. The same `secret` also keys the signed upload/download links (`link_key`) and seals the
few secrets a task must keep until it runs, on whichever replica (`seal`/`unseal`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography.fernet import Fernet, InvalidToken

# scrypt at n=2**14, r=8, p=1: ~16 MiB and tens of ms per check, the usual interactive setting.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
DEFAULT_TOKEN_TTL_S = 3600
TOKEN_PREFIX = "veil1"


class AuthError(Exception):
    """Missing or bad credentials; the message is safe to show (it never echoes a secret)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$n$r$p$salt$hash`: what goes into the users file as `password_hash`."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(_unb64(digest)), maxmem=128 * int(n) * int(r) * int(p) + 2**20)
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, _unb64(digest))


def hash_api_key(key: str) -> str:
    """API keys are long random strings, so a plain SHA-256 is enough (no salt, no stretching)."""
    return "sha256$" + hashlib.sha256(key.encode()).hexdigest()


@dataclass
class User:
    name: str
    password_hash: str
    token_ttl_s: int


@dataclass
class ApiKey:
    user: str
    account: str  # names the key's credit account in the storage: part of its hash, never the key
    credits: float | None = None  # the balance; None: no limit
    auto_approve_below: float | None = None  # None: the server's limit


def _optional_number(value, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{what}: a number >= 0 expected, got {value!r}")
    return float(value)


@dataclass
class Auth:
    users: dict[str, User] = field(default_factory=dict)
    api_keys: dict[str, ApiKey] = field(default_factory=dict)  # key hash -> its entry
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    secret_generated: bool = True  # tokens then die with the process and are not valid on other replicas

    @classmethod
    def from_file(cls, path: str | Path | None) -> Auth:
        if path is None:
            return cls()
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a users file is a mapping (secret, token_ttl_s, users, api_keys)")
        ttl = int(raw.get("token_ttl_s", DEFAULT_TOKEN_TTL_S))
        users = {}
        for name, entry in (raw.get("users") or {}).items():
            if not isinstance(entry, dict) or not str(entry.get("password_hash", "")).startswith("scrypt$"):
                raise ValueError(f"{path}: user {name!r} needs password_hash: scrypt$... (veil serve --hash-password)")
            users[str(name)] = User(str(name), entry["password_hash"], int(entry.get("token_ttl_s", ttl)))
        keys = {}
        for entry in raw.get("api_keys") or []:
            if not isinstance(entry, dict) or not str(entry.get("key_hash", "")).startswith("sha256$"):
                raise ValueError(f"{path}: api_keys entries are {{user: NAME, key_hash: sha256$..., credits: N}}")
            digest = entry["key_hash"].split("$", 1)[1]
            keys[entry["key_hash"]] = ApiKey(
                str(entry.get("user", "api-key")), digest[:32],
                _optional_number(entry.get("credits"), f"{path}: api_keys credits"),
                _optional_number(entry.get("auto_approve_below"), f"{path}: api_keys auto_approve_below"))
        secret = raw.get("secret")
        if secret is not None and len(str(secret)) < 16:
            raise ValueError(f"{path}: secret must be at least 16 characters")
        return cls(users, keys, str(secret).encode() if secret else secrets.token_bytes(32), secret is None)

    # --- passwords (Celantur signin, FaceBlurest Basic) ---
    def check_password(self, username: str, password: str) -> User:
        user = self.users.get(username)
        # verify against a dummy hash for unknown users too, so timing does not tell which names exist
        ok = verify_password(password, user.password_hash if user else _DUMMY_HASH)
        if not (user and ok):
            raise AuthError("Incorrect username or password.")
        return user

    def check_basic(self, header: str | None) -> User:
        return self.check_password(*self.parse_basic(header))

    @staticmethod
    def parse_basic(header: str | None) -> tuple[str, str]:
        """(username, password) of an `Authorization: Basic ...` header; AuthError if malformed."""
        if not header or not header.lower().startswith("basic "):
            raise AuthError("HTTP Basic credentials are required")
        try:
            username, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError("malformed HTTP Basic credentials") from None
        return username, password

    # --- access tokens (Celantur) ---
    def issue_token(self, user: User, now: float | None = None) -> tuple[str, int]:
        """(token, lifetime in s): `veil1.<claims>.<HMAC-SHA256>` with the user and expiry."""
        now = time.time() if now is None else now
        claims = _b64(json.dumps({"sub": user.name, "iat": int(now), "exp": int(now) + user.token_ttl_s,
                                  "jti": secrets.token_hex(8)}, separators=(",", ":")).encode())
        signed = f"{TOKEN_PREFIX}.{claims}"
        return f"{signed}.{_b64(self._sign(signed))}", user.token_ttl_s

    def check_token(self, header: str | None) -> str:
        """The user named by a valid, unexpired token in `Authorization` (bare or `Bearer`)."""
        if not header:
            raise AuthError("Unauthorized")
        token = header[7:].strip() if header.lower().startswith("bearer ") else header.strip()
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise AuthError("Unauthorized")
        try:
            good = hmac.compare_digest(_unb64(parts[2]), self._sign(f"{parts[0]}.{parts[1]}"))
            claims = json.loads(_unb64(parts[1])) if good else {}
        except (ValueError, binascii.Error):
            raise AuthError("Unauthorized") from None
        if not good:
            raise AuthError("Unauthorized")
        if time.time() >= float(claims.get("exp", 0)):
            raise AuthError("The access token expired: sign in again")
        if claims.get("sub") not in self.users:  # a user removed from the file loses access at once
            raise AuthError("Unauthorized")
        return claims["sub"]

    def _sign(self, text: str) -> bytes:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).digest()

    # --- API keys (Syntonym) ---
    def check_api_key(self, key: str | None) -> str:
        """The user an `x-api-key` belongs to."""
        return self.api_key(key).user

    def api_key(self, key: str | None) -> ApiKey:
        """The entry of a valid `x-api-key` (user, credit account, balance)."""
        if not key:
            raise AuthError("an x-api-key header is required")
        wanted, found = hash_api_key(key), None
        for stored, entry in self.api_keys.items():  # all compared: the time does not tell which matched
            if hmac.compare_digest(stored, wanted):
                found = entry
        if found is None:
            raise AuthError("invalid API key")
        return found

    # --- keys derived from the secret: links and sealed values ---
    @property
    def link_key(self) -> bytes:
        """HMAC key of the upload/download links: derived, so a link signature never passes for a token's."""
        return hmac.new(self.secret, b"veil links v1", hashlib.sha256).digest()

    def _fernet(self) -> Fernet:
        return Fernet(base64.urlsafe_b64encode(hmac.new(self.secret, b"veil sealed v1", hashlib.sha256).digest()))

    def seal(self, text: str) -> str:
        """`text` encrypted and authenticated with the secret, so any replica with the same users file
        opens it: a webhook's header value that must outlive the request that gave it."""
        return self._fernet().encrypt(text.encode()).decode()

    def unseal(self, token: str) -> str | None:
        """The sealed text, or None when it was sealed under another secret."""
        try:
            return self._fernet().decrypt(token.encode()).decode()
        except (InvalidToken, ValueError):
            return None


_DUMMY_HASH = hash_password("not a password of anyone", salt=b"veil-dummy-salt!")
