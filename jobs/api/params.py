"""The seed APIs' query parameters -> a JobSpec, with the CLI's rules and error messages.

Requests carry the same options as `veil run` (the seed APIs' names, dashes or underscores), but
only those that describe *how to anonymize*: nothing that names a file, a URL to read or a
resource of the server (inputs, output, models, pricing, storage options, passwords) can come
from a request. The OpenAPI document lists these parameters from JobSpec's own schema, so the
document, the validation and the CLI agree.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from jobs.spec import JobSpec, SpecError, build_spec
from models.detections import CLASSES

_CLASSES = [c.replace("_", "-") for c in CLASSES]

# The JobSpec fields a request may set (their dashed names).
SEED_PARAMS = (
    "method", *_CLASSES, "bbox", "ignores", "debug", "score", "save-mask", "mask-scale", "save-metadata",
    "strip-metadata", "quality", "compress-level", "format", "profile",
    *[f"{c}-threshold" for c in _CLASSES],
    *[f"kernel-size-{c}" for c in _CLASSES],
    *[f"{c}-anonymization-gradient-{end}" for c in ("face", "license-plate") for end in ("start", "stop")],
    "webhook", "web-auth-header-name", "web-auth-header-value",
)
JSON_PARAMS = {"ignores"}  # sent as JSON text in the query string


class ParamError(ValueError):
    """A request parameter that cannot be used; the message starts with the parameter's name."""


def normalize(name: str) -> str:
    return name.replace("_", "-").lower()


def split_query(items: list[tuple[str, str]], allowed: tuple[str, ...]) -> dict[str, str]:
    """{dashed name: value}; refuses unknown and repeated parameters, naming them."""
    out: dict[str, str] = {}
    for raw, value in items:
        name = normalize(raw)
        if name not in allowed:
            raise ParamError(f"{raw}: unknown parameter; allowed: {', '.join(allowed)}")
        if name in out:
            raise ParamError(f"{raw}: given more than once")
        out[name] = value
    return out


def task_query(items: list[tuple[str, str]], extra: tuple[str, ...] = ()) -> tuple[dict[str, str], str | None,
                                                                                dict[str, str]]:
    """A task request's query: (seed parameters, `name`, the API's own `extra` parameters)."""
    params = split_query(items, SEED_PARAMS + ("name",) + extra)
    name = params.pop("name", None)
    if name is not None and (len(name) > 255 or re.search(r"[\x00-\x1f]", name)):
        raise ParamError("name: at most 255 characters, no control characters")
    own = {k: params.pop(k) for k in extra if k in params}
    return params, name, own


def check_webhook_host(name: str, url: str | None, webhook_hosts: tuple[str, ...] | None) -> None:
    """ParamError when the server may not call `url` (its --webhook-host list)."""
    if url and webhook_hosts is not None and urlsplit(url).hostname not in webhook_hosts:
        raise ParamError(f"{name}: host {urlsplit(url).hostname!r} is not allowed on this server "
                         f"(allowed: {', '.join(webhook_hosts) or 'none'})")


def build_task_spec(params: dict[str, object], original_url: str, tasks_root: str, task_id: str,
                    storage_options: dict | None = None, webhook_hosts: tuple[str, ...] | None = None) -> JobSpec:
    """The task's JobSpec: its input is the stored upload, its job folder the task's folder. `params`
    are query text, or the typed values a task recorded (`recorded`), when it is rebuilt to run."""
    fields: dict[str, object] = {k: v for k, v in params.items() if k in SEED_PARAMS}
    for name in JSON_PARAMS & fields.keys():
        if not isinstance(fields[name], str):
            continue
        try:
            fields[name] = json.loads(str(fields[name]))
        except json.JSONDecodeError as exc:
            raise ParamError(f"{name}: not valid JSON ({exc.msg})") from None
    fields.update(inputs=[original_url], output=tasks_root, job_id=task_id, storage_options=storage_options or {})
    try:
        spec = build_spec(fields)
        spec.resolve_models()  # a class no model serves is refused now, like `veil run` does
    except SpecError as exc:
        raise ParamError(str(exc)) from None
    check_webhook_host("webhook", spec.webhook, webhook_hosts)
    return spec


def recorded(spec: JobSpec) -> dict:
    """The parameters as the task records them (effective values; the webhook header value,
    a secret, is an excluded field and never appears)."""
    doc = spec.model_dump(mode="json", by_alias=True)
    return {k: doc[k] for k in SEED_PARAMS if k in doc}


def openapi_parameters(extra: list[dict] | None = None) -> list[dict]:
    """OpenAPI query parameters for SEED_PARAMS, from JobSpec's JSON schema."""
    props = JobSpec.model_json_schema(by_alias=True)["properties"]
    params = []
    for name in SEED_PARAMS:
        prop = props[name]
        schema = next((s for s in prop.get("anyOf", [prop]) if s.get("type") != "null"), {})
        schema = {k: v for k, v in schema.items() if k not in ("title", "$ref", "items")}
        if name in JSON_PARAMS or name == "format" or not schema.get("type"):
            schema = {"type": "string"}
        description = prop.get("description") or schema.pop("description", None)
        if name == "ignores":
            description = ('JSON list of areas left untouched: '
                           '[{"topLeftX": 0, "topLeftY": 0, "width": 10, "height": 10}]')
        elif name == "format":
            description = 'tiling: whole, auto, panorama or JSON {"number": [nx, ny], "overlap": [ox, oy]}'
        elif name == "web-auth-header-value":
            description = "value of the webhook's auth header (a secret: never stored nor logged)"
        if prop.get("default") is not None and name not in JSON_PARAMS:
            schema["default"] = prop["default"]
        params.append({"name": name, "in": "query", "required": False, "schema": schema,
                       **({"description": description} if description else {})})
    return params + (extra or [])
