"""Expiring links to the storage: veil-signed URLs to the service's own routes, or presigned S3 URLs.

Celantur v2 and Syntonym hand out URLs instead of taking or giving bytes in the API call itself:
an upload URL for the image or archive, download URLs for the results. The URL is the credential
(a client passes it to curl or a browser, without its token or API key), so it is short-lived
and names exactly one object and one method.

- Storage `s3://...`: a presigned S3 URL made by the storage's own botocore client (through s3fs,
  with `--storage-option` endpoint and credentials); the bytes never pass through the service.
- Any other storage: `<route>?expires=<unix s>&signature=<HMAC-SHA256(link key, "METHOD path expires")>`
  on this service. The key is derived from the users file's `secret`, so every replica verifies a
  link any replica made; the signature is compared in constant time, before the expiry is looked at
  (a tampered link is `SIGNATURE_INVALID` whatever its expiry).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import quote, urlencode

import fsspec

from operators.storage import filesystem, join


class LinkError(Exception):
    """A link that does not open: `code` is SIGNATURE_INVALID or SIGNATURE_EXPIRED (403 either way)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def is_s3(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in ("s3", "s3a")


class Links:
    def __init__(self, key: bytes, storage_options: dict | None = None, storage: str = ""):
        self.key = key
        self.storage_options = storage_options or {}
        self.storage = storage  # the service's storage root: `link` presigns S3 objects under it

    def link(self, base: str, route: str, relative: str, method: str, expires: int) -> str:
        """An expiring URL to the storage object at `relative` (under the storage root): presigned S3
        when the storage is S3, else `route` on this service (`base`), signed."""
        if is_s3(self.storage):
            return self.presigned(join(self.storage, relative), method, expires)
        return self.signed(base, method, route, expires)

    def signature(self, method: str, path: str, expires: int) -> str:
        mac = hmac.new(self.key, f"{method.upper()} {path} {int(expires)}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def signed(self, base: str, method: str, path: str, expires: int) -> str:
        """`base` + `path` (decoded; quoted here) with its expiry and signature."""
        query = urlencode({"expires": int(expires), "signature": self.signature(method, path, expires)})
        return f"{base.rstrip('/')}{quote(path)}?{query}"

    def verify(self, method: str, path: str, expires: str | None, signature: str | None,
               now: float | None = None) -> None:
        """LinkError unless `signature` is this service's for (method, path, expires) and not expired."""
        if not expires or not signature or not expires.isdigit() or len(expires) > 12:
            raise LinkError("SIGNATURE_INVALID", "the link has no valid expires/signature")
        if not hmac.compare_digest(signature.encode(), self.signature(method, path, int(expires)).encode()):
            raise LinkError("SIGNATURE_INVALID", "the link's signature does not match (changed or not ours)")
        if (time.time() if now is None else now) > int(expires):
            raise LinkError("SIGNATURE_EXPIRED", "the link expired; ask for a fresh one")

    def presigned(self, url: str, method: str, expires: int) -> str:
        """A presigned S3 URL for one object (`method` GET or PUT) valid until `expires` (unix s)."""
        fs, path = filesystem(url, self.storage_options)
        client_method = {"GET": "get_object", "PUT": "put_object"}[method.upper()]
        return fs.url(path, expires=max(1, int(expires - time.time())), client_method=client_method)
