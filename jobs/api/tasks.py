"""Task state in the storage: one folder per task, laid out like a job, with its task.json.

    STORAGE/tasks/<id>/task.json                  status, timestamps, parameters, detections
    STORAGE/tasks/<id>/original/upload            Celantur v2: where the upload URL puts it, until checked
    STORAGE/tasks/<id>/original/<file>            the upload as received
    STORAGE/tasks/<id>/images/<file>              anonymized (the job layout: OUTPUT=STORAGE/tasks, JOB_ID=<id>)
    STORAGE/tasks/<id>/masks/{binary,instance}/<file>.png
    STORAGE/tasks/<id>/metadata/<file>.json

There is no database and no in-memory index: any replica that reads the storage answers for any
task. Task ids are made here (128 random bits, hex) and every id from a request is checked
against that exact pattern before it comes near a path; `<file>` is one of two fixed names.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from pathlib import Path

from jobs.report import now_iso
from operators.storage import filesystem, join, read_bytes, write_atomic

DEFAULT_STORAGE = str(Path.home() / ".cache" / "veil" / "service")
TASK_ID = re.compile(r"[0-9a-f]{32}")
# by the declared content type, never a client's name (videos: the Celantur container only)
FILE_NAMES = {"jpeg": "image.jpg", "png": "image.png", "mp4": "video.mp4", "mov": "video.mov", "mkv": "video.mkv",
              "webm": "video.webm", "avi": "video.avi"}

# What each download route serves, relative to the task folder ({file} is the task's file name).
OUTPUTS = {
    "anonymized": "images/{file}",
    "binary-mask": "masks/binary/{file}.png",
    "instance-mask": "masks/instance/{file}.png",
    "metadata": "metadata/{file}.json",
    "original": "original/{file}",
}

# Fields of task.json that stay inside the service (who owns it, where its files are, a sealed secret).
PRIVATE_FIELDS = ("owner", "file", "sealed_header_value")


class TaskNotFound(LookupError):
    pass


class TaskStore:
    def __init__(self, storage: str, storage_options: dict | None = None):
        self.root = join(storage, "tasks")
        self.storage_options = storage_options or {}

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def folder(self, task_id: str) -> str:
        """The task's folder; TaskNotFound for anything that is not an id this service could have made."""
        if not isinstance(task_id, str) or not TASK_ID.fullmatch(task_id):
            raise TaskNotFound(task_id)
        return join(self.root, task_id)

    def url(self, task_id: str, relative: str) -> str:
        return join(self.folder(task_id), relative)

    def save(self, doc: dict) -> dict:
        doc["updated"] = now_iso()
        write_atomic(self.url(doc["id"], "task.json"), json.dumps(doc, indent=1, default=str).encode(),
                     self.storage_options)
        return doc

    def load(self, task_id: str, owner: str | None = None, api: str | None = None) -> dict:
        """task.json; TaskNotFound when missing, or owned by another user or another API shape
        (a user never learns whether someone else's task id exists)."""
        try:
            doc = json.loads(read_bytes(self.url(task_id, "task.json"), self.storage_options))
        except FileNotFoundError:
            raise TaskNotFound(task_id) from None
        if (owner is not None and doc.get("owner") != owner) or (api is not None and doc.get("api") != api):
            raise TaskNotFound(task_id)
        return doc

    def exists(self, task_id: str) -> bool:
        fs, path = filesystem(self.url(task_id, "task.json"), self.storage_options)
        return fs.exists(path)

    def put(self, task_id: str, relative: str, data: bytes) -> str:
        url = self.url(task_id, relative)
        write_atomic(url, data, self.storage_options)
        return url

    def delete_file(self, task_id: str, relative: str) -> None:
        fs, path = filesystem(self.url(task_id, relative), self.storage_options)
        if fs.exists(path):
            fs.rm(path)

    def output(self, doc: dict, kind: str) -> bytes:
        """The bytes of one output of a task (OUTPUTS key); TaskNotFound when it was not made."""
        if kind not in OUTPUTS or doc.get("file") not in FILE_NAMES.values():
            raise TaskNotFound(doc.get("id", ""))
        try:
            return read_bytes(self.url(doc["id"], OUTPUTS[kind].format(file=doc["file"])), self.storage_options)
        except FileNotFoundError:
            raise TaskNotFound(doc["id"]) from None

    def list(self, owner: str, api: str, page: int = 1, limit: int = 20) -> dict:
        """Celantur v1's list shape, newest first. Reads every task.json: fine for thousands of
        tasks; a larger service wants an index (one per owner) next to them."""
        fs, root = filesystem(self.root, self.storage_options)
        paths = fs.glob(root.rstrip("/") + "/*/task.json") if fs.exists(root) else []
        docs = []
        for path in paths:
            try:
                doc = json.loads(fs.cat_file(path))
            except (OSError, ValueError):
                continue  # deleted or being replaced right now
            if doc.get("owner") == owner and doc.get("api") == api:
                docs.append(doc)
        docs.sort(key=lambda d: (d.get("created") or "", d.get("id") or ""), reverse=True)
        items = [public(d) for d in docs[(page - 1) * limit: page * limit]]
        return {"total_item_count": len(docs), "total_page_count": math.ceil(len(docs) / limit),
                "page": page, "limit": limit, "items": items}

    def delete(self, task_id: str) -> None:
        fs, path = filesystem(self.folder(task_id), self.storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def public(doc: dict) -> dict:
    """task.json as a client sees it."""
    return {k: v for k, v in doc.items() if k not in PRIVATE_FIELDS}
