"""`veil serve`: run the HTTP service with uvicorn; `--hash-password` / `--hash-api-key` for the users file."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import secrets
import sys

from jobs.cli.run import _opt, _storage_option


def add_serve_command(sub) -> None:
    """Register `serve` on the `veil` subparsers."""
    from jobs.api.tasks import DEFAULT_STORAGE  # no FastAPI import: `veil run` must not need it

    p = sub.add_parser("serve", help="the seed APIs (Celantur v1, v2 and container, Syntonym, FaceBlurest) over HTTP")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"fsspec URL for uploads, outputs and task state, shared by replicas "
                        f"(default {DEFAULT_STORAGE})")
    _opt(p, "--storage-option", type=_storage_option, action="append", dest="storage_option", metavar="KEY=VALUE",
         help="fsspec option for a remote --storage, e.g. endpoint_url=http://127.0.0.1:9000")
    p.add_argument("--users", help="users file (YAML): secret, token_ttl_s, users with password_hash, api_keys")
    _opt(p, "--max-upload-mb", type=float, default=10.0, help="largest image upload, MB (default 10)")
    _opt(p, "--max-archive-mb", type=float, default=2048.0,
         help="largest archive uploaded to a Syntonym session, MB (default 2048; streamed, not held in memory)")
    _opt(p, "--public-url", help="base URL of the upload/download links this server signs, as clients reach it "
                                 "(default: the Host of each request)")
    _opt(p, "--link-ttl", type=int, default=900, help="lifetime of download links, s (default 900)")
    _opt(p, "--upload-ttl", type=int, default=3600, help="lifetime of upload links, s (default 3600)")
    p.add_argument("--pricing", help="pricing table (YAML/JSON) for Syntonym jobs' credits, laid over the default")
    _opt(p, "--auto-approve-below", type=float,
         help="Syntonym jobs quoted below this many credits start without approve_job (default: the pricing "
              "table's auto_approve_below; none = always approve)")
    p.add_argument("--workers", type=int, default=2, help="images processed at once by this server (default 2)")
    _opt(p, "--max-queue", type=int, default=64, help="asynchronous tasks waiting before 503 (default 64)")
    _opt(p, "--rate-limit", type=int, default=600,
         help="requests per minute per user or API key in this replica, bursts up to the same; 0 = none "
              "(default 600)")
    _opt(p, "--allow-url-fetch", action="store_true",
         help="let FaceBlurest's photo_url make this server fetch a URL (off: any URL it can reach is exposed)")
    _opt(p, "--webhook-host", action="append", metavar="HOST",
         help="only these hosts may receive webhooks (repeatable; default: any host)")
    _opt(p, "--ray-address", default=os.environ.get("RAY_ADDRESS") or None,
         help="run Syntonym jobs on this Ray cluster through its Jobs API, e.g. http://head:8265, as `veil submit` "
              "does (default: RAY_ADDRESS; unset: in this process). Image tasks always run here")
    _opt(p, "--requeue-after", type=int, default=600,
         help="re-queue image tasks left queued/processing this many seconds by a replica that stopped; "
              "checked at start-up and as often (default 600; 0 = never)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where detection runs")
    p.add_argument("--warm", default="face,license-plate",
                   help="classes whose models load at start-up (comma-separated; '' = on first use)")
    _opt(p, "--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _opt(p, "--hash-password", action="store_true",
         help="print a password_hash for the users file (password read from stdin or prompted) and exit")
    _opt(p, "--hash-api-key", action="store_true",
         help="make a random API key, print it and its key_hash for the users file, and exit")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from jobs.api.auth import hash_api_key, hash_password

    if args.hash_password:
        password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("password: ")
        if not password:
            print("veil serve: empty password", file=sys.stderr)
            return 2
        print(hash_password(password))
        return 0
    if args.hash_api_key:
        key = "veil_" + secrets.token_urlsafe(32)
        print(f"api key (give it to the client, it is not stored): {key}\nkey_hash: {hash_api_key(key)}")
        return 0

    import uvicorn

    from jobs.api.app import create_app
    from jobs.api.config import ServiceConfig

    if args.auto_approve_below is not None and not args.auto_approve_below >= 0:
        print(f"veil serve: --auto-approve-below must be a number of credits >= 0 (got {args.auto_approve_below:g})",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServiceConfig(
        storage=args.storage,
        storage_options=dict(args.storage_option or []),
        users_file=args.users,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        workers=max(1, args.workers),
        max_queue=max(0, args.max_queue),
        rate_limit_per_minute=max(0, args.rate_limit),
        allow_url_fetch=args.allow_url_fetch,
        webhook_hosts=tuple(args.webhook_host) if args.webhook_host else None,
        device=args.device,
        warm_classes=tuple(c.strip().replace("-", "_") for c in args.warm.split(",") if c.strip()),
        public_url=args.public_url,
        link_ttl_s=max(1, args.link_ttl),
        upload_ttl_s=max(1, args.upload_ttl),
        max_archive_upload_bytes=int(args.max_archive_mb * 2**20),
        pricing=args.pricing,
        auto_approve_below=args.auto_approve_below,
        ray_address=args.ray_address or None,
        requeue_after_s=max(0, args.requeue_after),
    )
    if not args.users:
        logging.getLogger("veil.serve").warning("no --users file: nobody can sign in")
    # uvicorn's own access log prints query strings, where a webhook's auth header value may be: ours does not
    uvicorn.run(create_app(config), host=args.host, port=args.port, access_log=False, log_level=args.log_level)
    return 0
