"""Archives: real zip / 7z built here from real photos, real RAR fixtures, every hostile case."""

from __future__ import annotations

import stat
import subprocess
import zipfile
from pathlib import Path

import py7zr
import pytest
from conftest import SHARED

from operators.archives import ArchiveOptions, expand_archive, expand_rows, read_member
from operators.prepare import prepare_batch
from operators.sources import list_sources

RAR = SHARED / "fixtures" / "rar"


def source_row(path: Path) -> dict:
    """The listing row of one archive, as list_sources makes it."""
    (row,) = list_sources([str(path)])
    return row


def expand(path: Path, **opts) -> dict[str, dict]:
    return {r["member"]: r for r in expand_archive(source_row(path), ArchiveOptions(**opts))}


def verdicts(rows: dict[str, dict]) -> dict[str, tuple[str, str]]:
    return {m: (r["status"] or "ok", r["failure_cause"]) for m, r in rows.items()}


def read(row: dict, **kw) -> bytes:
    return read_member(row, **kw)


@pytest.fixture
def faces(photos):
    folder, _ = photos("faces", 3)
    return sorted(folder.iterdir())


def test_zip_members_become_items_read_alone(faces, tmp_path):
    archive = tmp_path / "drive.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(faces[0], "cam1/a.jpg", compress_type=zipfile.ZIP_DEFLATED)
        z.write(faces[1], "cam1/b.jpg", compress_type=zipfile.ZIP_STORED)
        z.write(faces[2], "cam2\\c.jpg")  # a Windows-made name: backslash is a separator
        z.writestr("cam1/", b"")
        z.writestr("notes.txt", b"not a photo")
    rows = expand(archive)
    assert verdicts(rows) == {
        "cam1/a.jpg": ("ok", ""),
        "cam1/b.jpg": ("ok", ""),
        "cam2\\c.jpg": ("ok", ""),
        "notes.txt": ("skipped", ""),
    }
    assert rows["cam2\\c.jpg"]["rel_path"] == "drive.zip/cam2/c.jpg"
    assert rows["cam1/a.jpg"]["data"] == b""  # read later, alone, by prepare
    assert read(rows["cam1/a.jpg"]) == faces[0].read_bytes()
    assert read(rows["cam2\\c.jpg"]) == faces[2].read_bytes()
    assert len({r["item_id"] for r in rows.values()}) == 4
    keys = {tuple(sorted(r)) for r in rows.values()}
    assert len(keys) == 1  # one schema for every row (Arrow blocks)


@pytest.mark.parametrize("tool", [["zip", "-q", "-r"], ["7z", "a", "-tzip", "-bd", "-bso0"]])
def test_zip_made_by_command_line_tools(faces, tmp_path, tool):
    src = faces[0].parent
    archive = tmp_path / "cli.zip"
    subprocess.run([*tool, str(archive), "."], cwd=src, check=True)
    rows = expand(archive)
    assert sorted(rows) == sorted(p.name for p in faces)
    for p in faces:
        assert read(rows[p.name]) == p.read_bytes()


@pytest.mark.parametrize("solid", ["on", "off"])
def test_7z_from_debian_7z_solid_and_not(faces, tmp_path, solid):
    archive = tmp_path / f"s-{solid}.7z"
    subprocess.run(
        ["7z", "a", "-t7z", "-m0=lzma2", f"-ms={solid}", "-bd", "-bso0", str(archive), "."],
        cwd=faces[0].parent,
        check=True,
    )
    rows = expand(archive)
    assert verdicts(rows) == {p.name: ("ok", "") for p in faces}
    for p in faces:
        row = rows[p.name]
        # solid: the block is the unit, members travel in the row; non-solid: read alone later
        assert (row["data"] != b"") is (solid == "on")
        assert read(row) == p.read_bytes()


def test_7z_from_py7zr_with_folders(faces, tmp_path):
    archive = tmp_path / "py.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        for i, p in enumerate(faces):
            z.write(p, f"d{i}/{p.name}")
    rows = expand(archive)
    assert {r["rel_path"] for r in rows.values()} == {f"py.7z/d{i}/{p.name}" for i, p in enumerate(faces)}
    assert all(read(rows[f"d{i}/{p.name}"]) == p.read_bytes() for i, p in enumerate(faces))


RAR_CASES = {
    "komga-rar4-images.rar": {f"komga-{i}.png": ("ok", "") for i in (1, 2, 3)},
    "komga-rar4-solid-images.rar": {f"komga-{i}.png": ("ok", "") for i in (1, 2, 3)},
    "komga-rar5-images.rar": {"komga.png": ("ok", "")},
    "ssokolow-rar4-images.cbr": {"testfile.jpg": ("ok", ""), "testfile.png": ("ok", "")},
    "ssokolow-rar5-solid-images.cbr": {"testfile.jpg": ("ok", ""), "testfile.png": ("ok", "")},
    "komga-rar5-solid-images.rar": {f"komga-{i}.png": ("failed", "ARCHIVE_ERROR") for i in (1, 2, 3)},
    "komga-rar4-encrypted-unknownpw.rar": {"": ("failed", "ENCRYPTED")},
    "komga-rar5-encrypted-unknownpw.rar": {"": ("failed", "ENCRYPTED")},
    "rarfile-rar5-headerenc-pw-password.rar": {"": ("failed", "ENCRYPTED")},
    "junrar-rar-parent-dir-traversal.rar": {"../../tmp/existing-file": ("failed", "UNSAFE_PATH")},
    "junrar-rar-sibling-prefix-traversal.rar": {"../extract_evil/pwned.txt": ("failed", "UNSAFE_PATH")},
    "rarfile-rar5-evil-symlink-traversal.rar": {"up": ("failed", "UNSAFE_PATH"), "up/pwned.txt": ("skipped", "")},
    "junrar-rar7-declares-4GiB-member.rar": {"zeros.bin": ("failed", "TOO_LARGE")},
    "junrar-rar-valueerror-on-open.rar": {"": ("failed", "ARCHIVE_ERROR")},
    "corrupt-rar4-png-stored-member2-badheadercrc.rar": {"komga-1.png": ("ok", ""), "": ("failed", "ARCHIVE_ERROR")},
    "corrupt-rar3-cbr-header-only.cbr": {"": ("skipped", "")},  # no members: one row for the archive
    "rarfile-rar5-vols.part2.rar": {"": ("skipped", "")},
    "rarfile-rar4-vols.part1.rar": {"vols/bigfile.txt": ("skipped", ""), "vols/smallfile.txt": ("skipped", "")},
}


@pytest.mark.parametrize("name", sorted(RAR_CASES))
def test_rar_fixtures(name):
    assert verdicts(expand(RAR / name)) == RAR_CASES[name]


def test_rar_members_read_match_parity_zip():
    want = zipfile.ZipFile(RAR / "komga-parity-images.zip").read("komga.png")
    for name in ("komga-rar4-images.rar", "komga-rar4-solid-images.rar"):
        rows = expand(RAR / name)
        assert all(read(r) == want for r in rows.values())


@pytest.mark.parametrize(
    "name, bad",
    [
        ("corrupt-rar4-png-stored-member2-dataflip.rar", "komga-2.png"),
        ("corrupt-rar4-png-stored-truncated-in-member2.rar", "komga-2.png"),
        ("corrupt-rar5-cbr-jpg-dataflip.cbr", "testfile.jpg"),
    ],
)
def test_corrupt_rar_member_fails_alone(name, bad):
    rows = expand(RAR / name)
    out = prepare_batch(_batch(rows.values()))
    got = dict(zip(out["member"], zip(out["status"], out["failure_cause"], strict=True), strict=True))
    assert got[bad] == ("failed", "ARCHIVE_ERROR")
    assert all(s == "pending" for m, (s, _) in got.items() if m not in (bad, ""))


def test_rar_header_encrypted_with_password():
    archive = RAR / "rarfile-rar5-headerenc-pw-password.rar"
    # the names are only readable with the password; text members are then skipped, not read
    assert verdicts(expand(archive, password="password")) == {
        "stest1.txt": ("skipped", ""),
        "stest2.txt": ("skipped", ""),
    }
    assert verdicts(expand(archive, password="nope")) == {"": ("failed", "ENCRYPTED")}


def _batch(rows) -> dict:
    import numpy as np

    rows = list(rows)
    out = {}
    for k in rows[0]:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[k] for r in rows]
        out[k] = col
    return out


def _cd_patch(path: Path, member: str, field_offset: int, value: int) -> None:
    """Rewrite one 32-bit field of a member's central directory entry (a lying header)."""
    data = bytearray(path.read_bytes())
    pos = data.find(b"PK\x01\x02" + b"", 0)
    while pos >= 0:
        n = int.from_bytes(data[pos + 28 : pos + 30], "little")
        if data[pos + 46 : pos + 46 + n] == member.encode():
            data[pos + field_offset : pos + field_offset + 4] = value.to_bytes(4, "little")
            path.write_bytes(bytes(data))
            return
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(member)


def test_hostile_zip_names_and_symlinks(faces, tmp_path):
    archive = tmp_path / "evil.zip"
    photo = faces[0].read_bytes()
    with zipfile.ZipFile(archive, "w") as z:
        for name in (
            "../up.jpg",
            "/etc/abs.jpg",
            "C:/drive.jpg",
            "c:\\win.jpg",
            "a\\..\\..\\b.jpg",
            "nulX.jpg",
            "ok/fine.jpg",
            "ok//fine.jpg",
            "x!/y.jpg",
        ):
            z.writestr(name, photo)
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "../../etc/passwd")
    # zipfile cuts names at NUL when writing; put a real NUL in both headers by hand
    archive.write_bytes(archive.read_bytes().replace(b"nulX.jpg", b"nul\0.jpg"))
    got = verdicts(expand(archive))
    assert got["nul\0.jpg"] == ("failed", "UNSAFE_PATH")
    unsafe = {m for m, v in got.items() if v == ("failed", "UNSAFE_PATH")}
    assert got["ok/fine.jpg"] == ("ok", "")
    assert got["ok//fine.jpg"] == ("failed", "OUTPUT_PATH_ERROR")  # the same output path as ok/fine.jpg
    assert unsafe == set(got) - {"ok/fine.jpg", "ok//fine.jpg"}
    assert all(".." not in r["rel_path"] and not r["rel_path"].startswith("/") for r in expand(archive).values())


def test_zip_bomb_and_lying_headers(faces, tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb.bmp", b"\0" * (40 << 20))  # 40 MiB of zeros: ratio ~1000
        z.write(faces[0], "small-liar.jpg")
        z.write(faces[1], "huge-liar.jpg")
        z.write(faces[2], "fine.jpg")
    _cd_patch(archive, "small-liar.jpg", 24, 100)  # declares 100 bytes, holds a whole photo
    _cd_patch(archive, "huge-liar.jpg", 24, 3 << 30)  # declares 3 GiB
    rows = expand(archive)
    assert verdicts(rows) == {
        "bomb.bmp": ("failed", "TOO_LARGE"),
        "small-liar.jpg": ("ok", ""),
        "huge-liar.jpg": ("failed", "TOO_LARGE"),
        "fine.jpg": ("ok", ""),
    }
    out = prepare_batch(_batch(rows.values()))
    got = dict(zip(out["member"], zip(out["status"], out["failure_cause"], strict=True), strict=True))
    assert got["small-liar.jpg"] == ("failed", "ARCHIVE_ERROR")  # never more than it declared; CRC fails
    assert got["fine.jpg"] == ("pending", "")
    assert got["bomb.bmp"] == ("failed", "TOO_LARGE")  # expand's verdict passes through prepare


def test_archive_total_limit(faces, tmp_path):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in faces:
            z.write(p, p.name)
    limit = faces[0].stat().st_size + faces[1].stat().st_size
    got = verdicts(expand(archive, max_archive_bytes=limit))
    assert list(got.values()) == [("ok", ""), ("ok", ""), ("failed", "TOO_LARGE")]


def test_encrypted_zip(faces, tmp_path):
    archive = tmp_path / "enc.zip"
    subprocess.run(["zip", "-q", "-P", "s3cret", str(archive), faces[0].name], cwd=faces[0].parent, check=True)
    with zipfile.ZipFile(archive, "a") as z:
        z.write(faces[1], "plain.jpg")
    assert verdicts(expand(archive)) == {faces[0].name: ("failed", "ENCRYPTED"), "plain.jpg": ("ok", "")}
    rows = expand(archive, password="s3cret")
    assert rows[faces[0].name]["data"] == faces[0].read_bytes()  # the password never leaves expand
    assert verdicts(expand(archive, password="wrong"))[faces[0].name] == ("failed", "ENCRYPTED")


def test_encrypted_7z(faces, tmp_path):
    plain_headers, enc_headers = tmp_path / "p.7z", tmp_path / "h.7z"
    for path, hdr in ((plain_headers, False), (enc_headers, True)):
        with py7zr.SevenZipFile(path, "w", password="pw") as z:
            z.set_encrypted_header(hdr)
            z.write(faces[0], "a.jpg")
    assert verdicts(expand(plain_headers)) == {"a.jpg": ("failed", "ENCRYPTED")}
    assert verdicts(expand(enc_headers)) == {"": ("failed", "ENCRYPTED")}
    assert expand(enc_headers, password="pw")["a.jpg"]["data"] == faces[0].read_bytes()


def test_truncated_and_corrupt_archives(faces, tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as z:
        for p in faces:
            z.write(p, p.name)
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    # the central directory is gone: members are found by their local headers, the first one
    # is whole, the second is cut (fails when read), and the archive row says what happened
    rows = expand(cut)
    assert verdicts(rows) == {faces[0].name: ("ok", ""), faces[1].name: ("ok", ""), "": ("failed", "ARCHIVE_ERROR")}
    out = prepare_batch(_batch(rows.values()))
    got = dict(zip(out["member"], out["failure_cause"], strict=True))
    assert got == {faces[0].name: "", faces[1].name: "ARCHIVE_ERROR", "": "ARCHIVE_ERROR"}
    assert read(rows[faces[0].name]) == faces[0].read_bytes()
    flipped = tmp_path / "flip.zip"
    data = bytearray(good.read_bytes())
    info = zipfile.ZipFile(good).getinfo(faces[1].name)
    data[info.header_offset + 30 + len(faces[1].name) + 500] ^= 0xFF
    flipped.write_bytes(bytes(data))
    rows = expand(flipped)
    out = prepare_batch(_batch(rows.values()))
    got = dict(zip(out["member"], out["failure_cause"], strict=True))
    assert got == {faces[0].name: "", faces[1].name: "ARCHIVE_ERROR", faces[2].name: ""}
    seven = tmp_path / "s.7z"
    subprocess.run(["7z", "a", "-ms=on", "-bd", "-bso0", str(seven), "."], cwd=faces[0].parent, check=True)
    cut7 = tmp_path / "cut.7z"
    cut7.write_bytes(seven.read_bytes()[: seven.stat().st_size // 2])
    assert verdicts(expand(cut7)) == {"": ("failed", "ARCHIVE_ERROR")}
    not_archive = tmp_path / "fake.zip"
    not_archive.write_bytes(faces[0].read_bytes())
    assert verdicts(expand(not_archive)) == {"": ("failed", "ARCHIVE_ERROR")}


def test_nested_archives_follow_depth(faces, tmp_path):
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as z:
        z.write(faces[0], "x/a.jpg")
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as z:
        z.write(inner, "sub/inner.zip")
        z.write(faces[1], "b.jpg")
    assert verdicts(expand(outer)) == {"sub/inner.zip": ("skipped", ""), "b.jpg": ("ok", "")}
    rows = expand(outer, depth=2)
    row = rows["sub/inner.zip!/x/a.jpg"]
    assert row["rel_path"] == "outer.zip/sub/inner.zip/x/a.jpg"
    assert row["data"] == faces[0].read_bytes()
    assert read(row | {"data": b""}) == faces[0].read_bytes()  # nested chains read alone too
    assert list(expand_rows(source_row(outer), ArchiveOptions(depth=0)))[0]["status"] == "skipped"


def test_listing_rows_pass_through_expand(faces):
    (row,) = list_sources([str(faces[0])])
    (out,) = expand_rows(row, ArchiveOptions())
    assert out == row | {"data": b""}


def test_job_over_mixed_input(ray_local, faces, tmp_path):
    """Plain images + zip (with hostile members) + solid 7z + RAR, end to end on local Ray."""
    from jobs.run import run_job
    from jobs.spec import build_spec
    from operators.manifest import read_table

    src = tmp_path / "batch"
    (src / "plain").mkdir(parents=True)
    (src / "plain" / "p.jpg").write_bytes(faces[0].read_bytes())
    with zipfile.ZipFile(src / "drive.zip", "w") as z:
        z.write(faces[1], "cam1/a.jpg")
        z.writestr("../../escape.jpg", faces[1].read_bytes())
        z.writestr("readme.txt", b"hello")
    subprocess.run(
        ["7z", "a", "-ms=on", "-bd", "-bso0", str(src / "solid.7z"), faces[1].name, faces[2].name],
        cwd=faces[0].parent,
        check=True,
    )
    out = tmp_path / "out"
    spec = build_spec(
        {
            "inputs": [str(src), str(RAR / "komga-rar4-*images.rar")],
            "output": str(out),
            "job_id": "mixed",
            "face": True,
            "detect_actors": 1,
            "repack": "zip",
        }
    )
    doc = run_job(spec, log=lambda *_: None)
    assert doc["status"] == "done"
    rows = read_table(str(out / "mixed"), "images").to_pylist()
    got = {r["rel_path"]: (r["status"], r["failure_cause"] or "") for r in rows}
    komga = {f"rar/komga-rar4{s}-images.rar/komga-{i}.png": ("done", "") for s in ("", "-solid") for i in (1, 2, 3)}
    assert got == {
        "batch/plain/p.jpg": ("done", ""),
        "batch/drive.zip/cam1/a.jpg": ("done", ""),
        "batch/drive.zip": ("failed", "UNSAFE_PATH"),  # the escaping member, under its archive
        "batch/drive.zip/readme.txt": ("skipped", ""),
        f"batch/solid.7z/{faces[1].name}": ("done", ""),
        f"batch/solid.7z/{faces[2].name}": ("done", ""),
        **komga,
    }
    assert len({r["item_id"] for r in rows}) == len(rows)
    written = {
        p.relative_to(out / "mixed" / "images").as_posix() for p in (out / "mixed" / "images").rglob("*") if p.is_file()
    }
    assert written == {k for k, v in got.items() if v[0] == "done"}
    assert not (tmp_path / "escape.jpg").exists() and not (out / "escape.jpg").exists()

    # --repack zip: one zip per input archive with its done members, byte-equal to the written images
    repacked = {r["archive"]: r for r in doc["repack"]}
    assert set(repacked) == {"batch/drive.zip", "batch/solid.7z", "rar/komga-rar4-images.rar",
                             "rar/komga-rar4-solid-images.rar"}
    for archive, entry in repacked.items():
        with zipfile.ZipFile(entry["url"]) as z:
            names = sorted(z.namelist())
            inside = [k[len(archive) + 1:] for k, v in got.items() if k.startswith(archive + "/") and v[0] == "done"]
            expected = sorted(inside)
            assert names == expected and entry["members"] == len(names)
            for name in names:
                assert z.read(name) == (out / "mixed/images" / archive / name).read_bytes()
    assert repacked["batch/solid.7z"]["url"].endswith("archives/batch/solid.7z.zip")


def test_archive_flags_reach_the_spec_and_the_password_stays_out_of_job_json(tmp_path):
    from jobs.cli import build_parser, spec_fields
    from jobs.pipeline import archive_options
    from jobs.spec import SpecError, build_spec

    pw = tmp_path / "pw.txt"
    pw.write_text("s3cret\n")
    argv = [
        "run",
        "in",
        "out",
        "--archive-depth",
        "2",
        "--archive_password_file",
        str(pw),
        "--max-member-bytes",
        "1000",
        "--max-archive-bytes",
        "5000",
        "--max-compression-ratio",
        "20",
    ]
    spec = build_spec(spec_fields(build_parser().parse_args(argv), ["in"], "out"))
    opts = archive_options(spec)
    assert (opts.depth, opts.password, opts.max_member_bytes, opts.max_archive_bytes) == (2, "s3cret", 1000, 5000)
    assert opts.max_compression_ratio == 20
    spec = build_spec({"inputs": ["in"], "output": "out", "archive-password": "s3cret"})
    assert "s3cret" not in str(spec.model_dump(mode="json")) and "s3cret" not in repr(spec)
    with pytest.raises(SpecError, match="archive-depth"):
        build_spec({"inputs": ["in"], "output": "out", "archive_depth": -1})
