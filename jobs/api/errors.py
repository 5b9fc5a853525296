"""Errors in each seed API's own shape.

Routes raise `ApiError` (Celantur's `{"message": ...}`) or a subclass for another API's shape;
errors raised by the framework itself (unknown route, bad JSON, a 405) are rendered in the shape
of the API whose path prefix they hit (`SHAPES`).

The seed APIs publish no machine-readable error catalogue; veil renders Celantur v2 and Syntonym
errors with a stable `code` (see `CODES`) next to the message, so clients can branch on it.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """Celantur's shape: `{"message": "..."}` with the HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"message": self.message}, status_code=self.status, headers=self.headers)


class FaceBlurestError(ApiError):
    """FaceBlurest's shape: `[{"cd": "1001", "description": "..."}]`."""

    UNAUTHORIZED, TOO_LARGE, INVALID_DATA, INTERNAL = "1001", "1013", "1014", "1099"
    RATE_LIMITED = "1029"  # not a seed code: FaceBlurest documents none for this

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.code = code

    def response(self) -> JSONResponse:
        return JSONResponse([{"cd": self.code, "description": self.message}], status_code=self.status,
                            headers=self.headers)


# HTTP status -> the `code` of a Celantur v2 / Syntonym error when the route gives none
CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 402: "INSUFFICIENT_CREDITS", 403: "FORBIDDEN",
         404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 409: "CONFLICT", 413: "TOO_LARGE",
         415: "UNSUPPORTED_MEDIA_TYPE", 422: "INVALID_PARAMETER", 429: "RATE_LIMITED", 500: "INTERNAL_ERROR",
         503: "BUSY"}


class CelanturV2Error(ApiError):
    """Celantur v2's shape: `{"code": "SIGNATURE_EXPIRED", "message": "..."}`."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.code = code or CODES.get(status, "ERROR")

    def response(self) -> JSONResponse:
        return JSONResponse({"code": self.code, "message": self.message}, status_code=self.status,
                            headers=self.headers)


class SyntonymError(ApiError):
    """Syntonym's shape: `{"status": "error", "error_code": "INVALID_API_KEY", "message": "..."}`."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.code = code or CODES.get(status, "ERROR")

    def response(self) -> JSONResponse:
        return JSONResponse({"status": "error", "error_code": self.code, "message": self.message},
                            status_code=self.status, headers=self.headers)


def _faceblurest(status: int, message: str) -> ApiError:
    code = {401: FaceBlurestError.UNAUTHORIZED, 413: FaceBlurestError.TOO_LARGE}.get(
        status, FaceBlurestError.INVALID_DATA if status < 500 else FaceBlurestError.INTERNAL)
    return FaceBlurestError(400 if status == 422 else status, code, message)


# path prefix -> how a framework error (status, message) becomes that API's error; the first match wins
SHAPES = [
    ("/v2/", CelanturV2Error),
    ("/syntonym/", SyntonymError),
    ("/faceblurest", _faceblurest),
    ("/", ApiError),  # Celantur v1 and container
]


def shaped(path: str, status: int, message: str) -> ApiError:
    for prefix, make in SHAPES:
        if path.startswith(prefix):
            return make(status, message)
    return ApiError(status, message)


def install_handlers(app) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body", "header")]
            parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg')}")
        return shaped(request.url.path, 422, "; ".join(parts)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        error = shaped(request.url.path, exc.status_code, message)
        error.headers = getattr(exc, "headers", None)
        return error.response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # The details go to the server's log (by the server), never to the caller.
        return shaped(request.url.path, 500, "internal error").response()
