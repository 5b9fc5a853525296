"""The item row: what flows between the stages, declared in one place.

One row per item (a file, or an archive member); a batch is a dict of columns (numpy arrays), as
Ray Data hands it to the stages. This module says which columns each stage adds (`COLUMNS`, the
table in ARCHITECTURE.md is made from it and checked by tests/test_rows.py), the values of `status`
(`Status`), the causes a row that is not done gives (`FailureCause`), and the one mapping from an
exception to its cause (`failure_cause`). A bad item never raises out of a stage: it becomes a row
with a cause, and the job goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

from operators.storage import is_unavailable


class Status:
    """The `status` column. UNDECIDED and PENDING steer the stages; the manifest holds the last three."""

    UNDECIDED = ""  # listed (or expanded), not prepared yet
    PENDING = "pending"  # prepared: to detect and write
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # not processed on purpose (not an image, the budget, an archive not expanded)


class FailureCause:
    """The `failure_cause` column: one word per kind of problem, so a report can count them
    (Celantur's causes, plus archive, video and storage ones). "" for a done row."""

    IMAGE_DEFECT = "IMAGE_DEFECT"
    CONTENT_TYPE_ERROR = "CONTENT_TYPE_ERROR"
    TOO_LARGE = "TOO_LARGE"
    TASK_FILE_DOESNT_EXIST = "TASK_FILE_DOESNT_EXIST"
    PARAMETER_ERROR_FORMAT = "PARAMETER_ERROR_FORMAT"
    UNSAFE_PATH = "UNSAFE_PATH"
    ENCRYPTED = "ENCRYPTED"
    ARCHIVE_ERROR = "ARCHIVE_ERROR"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    MULTI_FRAME = "MULTI_FRAME"
    OUTPUT_PATH_ERROR = "OUTPUT_PATH_ERROR"
    DETECTION_ERROR = "DETECTION_ERROR"
    VIDEO_DEFECT = "VIDEO_DEFECT"
    SOURCE_UNAVAILABLE = "SOURCE_UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"


CAUSES = {
    FailureCause.IMAGE_DEFECT: "the image data cannot be decoded, is truncated, or its header is broken",
    FailureCause.CONTENT_TYPE_ERROR: "the content is not a supported image, or not the format its name says",
    FailureCause.TOO_LARGE: "over a size limit: declared pixels, member bytes, archive bytes, compression ratio",
    FailureCause.TASK_FILE_DOESNT_EXIST: "the file vanished between listing and reading, or a link points nowhere",
    FailureCause.PARAMETER_ERROR_FORMAT: "a service task whose parameters are not taken (the service's tasks only)",
    FailureCause.UNSAFE_PATH: "a name that cannot become a path inside the job folder, or a link out of the input",
    FailureCause.ENCRYPTED: "an encrypted archive or member without the right password",
    FailureCause.ARCHIVE_ERROR: "a corrupt or truncated archive or member",
    FailureCause.BUDGET_EXCEEDED: "not processed: --max-credits reached",
    FailureCause.MULTI_FRAME: "a multi-page TIFF or animated PNG/WebP: veil writes single-frame images only",
    FailureCause.OUTPUT_PATH_ERROR: "the output path cannot be written: it collides with another item's, "
                                    "clashes with a file or folder, or is too long",
    FailureCause.DETECTION_ERROR: "the detector failed on this image (the rest of its batch goes on)",
    FailureCause.VIDEO_DEFECT: "a video that cannot be opened, has no video stream, or whose decoding breaks or ends "
                               "short of its declared frames (the frames before the damage are still written)",
    FailureCause.SOURCE_UNAVAILABLE: "the storage stayed unreachable after the client's retries (network, 5xx, "
                                     "throttling): --retry-failed takes the item up again",
    FailureCause.INTERNAL_ERROR: "anything else (the error column says what)",
}


class ItemFailure(Exception):
    """A bad item: becomes a row with `cause`, never an exception out of a stage. Exceptions that
    always mean one cause (operators.archive_formats' TooLarge, Encrypted) name it as a class attribute."""

    cause = FailureCause.INTERNAL_ERROR

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


def failure_cause(exc: BaseException, default: str = FailureCause.INTERNAL_ERROR) -> str:
    """The cause of an item whose stage raised `exc` (the one exception -> cause mapping): the cause
    the exception names (ItemFailure, TooLarge, Encrypted), TASK_FILE_DOESNT_EXIST for a vanished
    file, SOURCE_UNAVAILABLE for storage still unreachable after retries; else the stage's `default`
    (IMAGE_DEFECT while decoding, ARCHIVE_ERROR inside an archive, VIDEO_DEFECT for a video...)."""
    named = getattr(exc, "cause", None)
    if isinstance(named, str) and named in CAUSES:
        return named
    if isinstance(exc, FileNotFoundError):
        return FailureCause.TASK_FILE_DOESNT_EXIST
    if is_unavailable(exc):
        return FailureCause.SOURCE_UNAVAILABLE
    return default


# The verdict columns every row has from listing on (Arrow blocks need one schema), and their value
# before any stage decided: normalize_row (operators/archives.py) fills them in.
VERDICT_DEFAULTS = {"status": Status.UNDECIDED, "failure_cause": "", "error": "", "data": b""}


@dataclass(frozen=True)
class Column:
    names: str  # one column, or several that go together ("failure_cause, error")
    set_by: str
    meaning: str


COLUMNS = (
    Column("item_id", "sources / archives", "stable id: a hash of `source_url` (and `member`)"),
    Column("source_url", "sources", "the input file, as listed (local path or fsspec URL)"),
    Column("member", "archives", 'the path inside an archive ("" for a plain file)'),
    Column("rel_path", "sources / archives", "the safe relative output path under OUTPUT/JOB_ID/"),
    Column("size", "sources", "bytes of the source file"),
    Column("kind", "sources", "`image`, `archive`, `video` or other (by extension)"),
    Column("status", "every stage", '`Status`: "" undecided, `pending` (prepared), then `done`, `failed` or '
                                    "`skipped`"),
    Column("failure_cause, error", "every stage", "`FailureCause` (one word) and a message, when not done"),
    Column("data", "prepare", "the file's bytes"),
    Column("format, width, height, orientation", "prepare", "the decoded image (stored pixels, EXIF orientation)"),
    Column("det, det_w, det_h", "prepare", "the upright, downscaled RGB detection copy"),
    Column("credits", "prepare (budget)", "credits the item costs"),
    Column("t_read_ms, t_decode_ms, cpu_prepare_ms", "prepare", "timings"),
    Column("dets_boxes, dets_scores, dets_class_ids, dets_tiles, dets_details, dets_models, dets_polygons", "detect",
           "`Detections` as arrays, one column per field (models/detections.py: to_row, from_row)"),
    Column("plan_shard", "plan", "the plan shard the item came from (its manifest parts and marker are named "
                                 "after it)"),
    Column("video", "prepare / segments / detect", "a video's header, segment span and, after detection, its "
                                                   'per-frame boxes (JSON; "" for images)'),
)


def columns_table() -> str:
    """COLUMNS as ARCHITECTURE.md's markdown table."""
    lines = ["| column | set by | meaning |", "|---|---|---|"]
    lines += ["| " + ", ".join(f"`{n.strip()}`" for n in c.names.split(",")) + f" | {c.set_by} | {c.meaning} |"
              for c in COLUMNS]
    return "\n".join(lines)
