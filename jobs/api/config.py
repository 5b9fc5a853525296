"""`veil serve`'s settings (ServiceConfig): one replica's limits, storage, links, pricing and Ray cluster."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.api.tasks import DEFAULT_STORAGE


@dataclass
class ServiceConfig:
    storage: str = DEFAULT_STORAGE
    storage_options: dict = field(default_factory=dict)
    users_file: str | None = None
    max_upload_bytes: int = 10 * 2**20  # Celantur / FaceBlurest routes
    workers: int = 2  # images processed at once by this replica
    max_queue: int = 64  # asynchronous tasks waiting in this replica before 503
    allow_url_fetch: bool = False  # FaceBlurest photo_url: the server would fetch any URL it is given
    webhook_hosts: tuple[str, ...] | None = None  # None: any host (the seed APIs' behaviour)
    device: str = "auto"
    max_pixels: int = 100_000_000
    warm_classes: tuple[str, ...] = ()  # classes whose models load at start-up
    public_url: str | None = None  # base of the links this service signs (default: the request's own)
    upload_ttl_s: int = 3600  # how long an upload URL (v2 task, Syntonym session) stays valid
    link_ttl_s: int = 900  # how long a download URL stays valid
    max_archive_upload_bytes: int = 2 * 2**30  # Syntonym archives: streamed to the storage, never held in memory
    pricing: str | None = None  # pricing table file (credits of API jobs; its auto_approve_below)
    auto_approve_below: float | None = None  # API jobs quoted below start at once; None: the pricing table's
    job_threads: int = 2  # API jobs driven at once (their images go through the same `workers`)
    rate_limit_per_minute: int = 600  # requests per user / API key per minute in this replica; 0 = no limit
    auth_failures_per_user: int = 10  # failed password checks per user name a minute, then 429; 0 = no limit
    auth_failures_per_address: int = 30  # ... per client address
    ray_address: str | None = None  # Syntonym jobs go to this Ray cluster (Jobs API); None: run in-process
    requeue_after_s: int = 600  # a task queued/processing this long without a change is re-queued; 0 = never
