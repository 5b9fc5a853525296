"""operators/rows.py: the item row's declaration agrees with ARCHITECTURE.md and the stages' rows,
and the one exception -> cause mapping gives each kind of failure its cause."""

from __future__ import annotations

import zipfile
from pathlib import Path

from models.detections import ROW_COLUMNS
from operators.archive_formats import Encrypted, TooLarge
from operators.archives import ArchiveOptions, expand_rows
from operators.prepare import PREPARED_COLUMNS
from operators.rows import CAUSES, COLUMNS, FailureCause, ItemFailure, columns_table, failure_cause
from operators.sources import list_sources

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_shows_the_declared_item_row():
    assert columns_table() in (ROOT / "ARCHITECTURE.md").read_text()


def test_every_column_a_stage_sets_is_declared(tmp_path):
    declared = {n.strip() for c in COLUMNS for n in c.names.split(",")}
    (tmp_path / "a.jpg").write_bytes(b"x")
    listed = list_sources([str(tmp_path)])
    assert set(listed[0]) <= declared
    assert set(PREPARED_COLUMNS) <= declared
    assert set(ROW_COLUMNS) <= declared  # the detect stage's


def test_every_cause_has_a_description():
    names = {v for k, v in vars(FailureCause).items() if k.isupper()}
    assert names == set(CAUSES)


def test_one_mapping_from_exceptions_to_causes(tmp_path):
    assert failure_cause(ItemFailure(FailureCause.MULTI_FRAME, "x")) == FailureCause.MULTI_FRAME
    assert failure_cause(TooLarge("bomb"), FailureCause.ARCHIVE_ERROR) == FailureCause.TOO_LARGE
    assert failure_cause(Encrypted("no password"), FailureCause.ARCHIVE_ERROR) == FailureCause.ENCRYPTED
    try:
        open(tmp_path / "gone.jpg", "rb")
    except OSError as exc:
        assert failure_cause(exc) == FailureCause.TASK_FILE_DOESNT_EXIST
    assert failure_cause(ConnectionResetError("peer"), FailureCause.ARCHIVE_ERROR) == FailureCause.SOURCE_UNAVAILABLE
    assert failure_cause(ValueError("odd bytes"), FailureCause.IMAGE_DEFECT) == FailureCause.IMAGE_DEFECT
    assert failure_cause(RuntimeError("?")) == FailureCause.INTERNAL_ERROR


def test_an_archive_that_vanished_after_listing_fails_as_missing(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("1.jpg", b"x")
    row = list_sources([str(path)])[0]
    path.unlink()
    (got,) = expand_rows(row, ArchiveOptions())
    assert (got["status"], got["failure_cause"]) == ("failed", FailureCause.TASK_FILE_DOESNT_EXIST)
