"""Failure causes of manifest rows (`failure_cause`): one word per kind of problem, so a report can
count them. Most stages still write their cause as a literal; this is the list they draw from, and
the constants below are the causes added for hostile input (README "Reliability")."""

from __future__ import annotations

CAUSES = {
    "IMAGE_DEFECT": "the image data cannot be decoded, is truncated, or its header is broken",
    "CONTENT_TYPE_ERROR": "the content is not a supported image, or not the format its name says",
    "TOO_LARGE": "over a size limit: declared pixels, member bytes, archive bytes, compression ratio",
    "TASK_FILE_DOESNT_EXIST": "the file vanished between listing and reading, or a link points nowhere",
    "UNSAFE_PATH": "a name that cannot become a path inside the job folder, or a link out of the input",
    "ENCRYPTED": "an encrypted archive or member without the right password",
    "ARCHIVE_ERROR": "a corrupt or truncated archive or member",
    "BUDGET_EXCEEDED": "not processed: --max-credits reached",
    "MULTI_FRAME": "a multi-page TIFF or animated PNG/WebP: veil writes single-frame images only",
    "OUTPUT_PATH_ERROR": "the output path cannot be written: it collides with another item's, "
                         "clashes with a file or folder, or is too long",
    "DETECTION_ERROR": "the detector failed on this image (the rest of its batch goes on)",
    "VIDEO_DEFECT": "a video that cannot be opened, has no video stream, or whose decoding breaks or ends short "
                    "of its declared frames (the frames before the damage are still written)",
    "INTERNAL_ERROR": "anything else (the error column says what)",
}

MULTI_FRAME = "MULTI_FRAME"
OUTPUT_PATH_ERROR = "OUTPUT_PATH_ERROR"
DETECTION_ERROR = "DETECTION_ERROR"
UNSAFE_PATH = "UNSAFE_PATH"
VIDEO_DEFECT = "VIDEO_DEFECT"
