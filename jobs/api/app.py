"""The FastAPI application: one router per seed API shape over one shared Service.

`create_app(ServiceConfig(...))` is all a host needs: uvicorn (`veil serve`), several replicas
behind a load balancer (they share nothing but the storage), or Ray Serve (see the README).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException

from jobs.api import celantur_container, celantur_v1, celantur_v2, faceblurest, syntonym
from jobs.api.errors import install_handlers, shaped
from jobs.api.service import Service, ServiceConfig

log = logging.getLogger("veil.serve")

# Each API shape is a router, with its error shape in errors.SHAPES and its credential check in auth.
ROUTERS = (celantur_v1.router, celantur_container.router, celantur_v2.router, syntonym.router, faceblurest.router)


def printable(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters with control and other unprintable characters (CR, LF,
    NUL, ...) and backslashes escaped, so a request path cannot forge or break a log line."""
    text = text[:limit]
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class AccessLog:
    """One line per request: method, path, status, time. Never the query string (a webhook's auth
    header value may travel there) nor any header (tokens, Basic credentials, API keys). The path
    is escaped (`printable`): `/health%0aFAKE` is logged as `/health\\nFAKE`, on one line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = {"status": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            log.info("%s %s %d %.0f ms", printable(scope["method"], 16), printable(scope["path"]), seen["status"],
                     (time.perf_counter() - t0) * 1e3)


JSON_BODY_LIMIT = 1 * 2**20  # bodies parsed whole by the framework (JSON requests)
SIGNIN_BODY_LIMIT = 16 * 1024  # a sign-in body is a user name and a password: nothing to check before it


class BodyLimit:
    """Every request body is capped before it is read: over its route's limit (by Content-Length at
    once, else while it streams in) the answer is 413 in the API's shape. Uploads have their own
    limits (`body_limit`); the other routes take JSON, which the framework reads whole before any
    credentials are checked, so those get 1 MiB, and sign-in, which has no credentials, 16 KiB."""

    def __init__(self, app, config: ServiceConfig):
        self.app, self.config = app, config

    def body_limit(self, path: str) -> int:
        c = self.config
        if path.startswith("/syntonym/upload/"):
            return c.max_archive_upload_bytes
        if path == "/faceblurest":
            return c.max_upload_bytes * 4 // 3 + 4096  # base64 in JSON
        if path in ("/v1/file", "/task") or path.startswith(("/v2/upload/", "/syntonym/direct_upload/")):
            return c.max_upload_bytes
        return SIGNIN_BODY_LIMIT if path == "/v1/signin" else JSON_BODY_LIMIT

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, path = self.body_limit(scope["path"]), scope["path"]
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = shaped(path, 413, f"the body is {int(declared)} bytes, over the {limit} byte limit").response()
            return await response(scope, receive, send)
        seen = 0

        async def capped_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # rendered by the app's HTTPException handler, in the API's shape
                    raise HTTPException(413, f"the body passes the {limit} byte limit")
            return message

        await self.app(scope, capped_receive, send)


def create_app(config: ServiceConfig | None = None) -> FastAPI:
    config = config or ServiceConfig()
    service = Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.warm_classes:  # load the models before the first caller has to wait for them
            from jobs.spec import build_spec

            spec = build_spec({"inputs": ["-"], "output": "-", **{c: True for c in config.warm_classes}})
            await asyncio.to_thread(service.processor.warm_up, spec)
        service.recovery.start()  # take up what stopped replicas left (its first sweep runs in its thread)
        yield
        service.close()

    app = FastAPI(
        title="veil service",
        version="1",
        summary="The seed anonymization APIs (Celantur v1, v2 and container, Syntonym, FaceBlurest) over veil's "
                "pipeline",
        lifespan=lifespan,
    )
    app.state.service = service
    install_handlers(app)
    for router in ROUTERS:
        app.include_router(router)

    @app.get("/health", tags=["service"], summary="Liveness (no credentials needed)")
    async def health() -> dict:
        return {"status": "ok"}

    app.add_middleware(BodyLimit, config=config)
    app.add_middleware(AccessLog)
    if service.auth.secret_generated:
        log.warning("no `secret` in the users file: access tokens are signed with a key made at start-up; they "
                    "end with this process and other replicas refuse them")
    return app


def app_from_env() -> FastAPI:
    """The app configured from VEIL_SERVICE_* variables: for hosts that build the app themselves,
    in each replica (`uvicorn --factory jobs.api.app:app_from_env --workers 4`, Ray Serve's
    `@serve.ingress(app_from_env)`). STORAGE, STORAGE_OPTIONS (JSON), USERS, MAX_UPLOAD_MB,
    MAX_ARCHIVE_MB, WORKERS, WEBHOOK_HOSTS (comma-separated), ALLOW_URL_FETCH (1), DEVICE, WARM
    (classes, comma-separated), PUBLIC_URL, PRICING, AUTO_APPROVE_BELOW, RAY_ADDRESS (default: the
    RAY_ADDRESS variable, as for `veil serve`; "" = in-process), REQUEUE_AFTER (s)."""
    import json
    import os

    from jobs.api.tasks import DEFAULT_STORAGE

    env = {k[len("VEIL_SERVICE_"):]: v for k, v in os.environ.items() if k.startswith("VEIL_SERVICE_")}
    if not logging.getLogger().handlers and not log.handlers:  # our access log, when the host set up none
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    hosts = env.get("WEBHOOK_HOSTS")
    return create_app(ServiceConfig(
        storage=env.get("STORAGE", DEFAULT_STORAGE),
        storage_options=json.loads(env.get("STORAGE_OPTIONS", "{}")),
        users_file=env.get("USERS"),
        max_upload_bytes=int(float(env.get("MAX_UPLOAD_MB", "10")) * 2**20),
        max_archive_upload_bytes=int(float(env.get("MAX_ARCHIVE_MB", "2048")) * 2**20),
        public_url=env.get("PUBLIC_URL"),
        pricing=env.get("PRICING"),
        auto_approve_below=float(env["AUTO_APPROVE_BELOW"]) if env.get("AUTO_APPROVE_BELOW") else None,
        workers=int(env.get("WORKERS", "2")),
        webhook_hosts=tuple(h.strip() for h in hosts.split(",") if h.strip()) if hosts is not None else None,
        allow_url_fetch=env.get("ALLOW_URL_FETCH", "") in ("1", "true", "yes"),
        device=env.get("DEVICE", "auto"),
        warm_classes=tuple(c.strip().replace("-", "_") for c in env.get("WARM", "face,license-plate").split(",")
                           if c.strip()),
        ray_address=env.get("RAY_ADDRESS", os.environ.get("RAY_ADDRESS")) or None,
        requeue_after_s=int(env.get("REQUEUE_AFTER", "600")),
    ))
