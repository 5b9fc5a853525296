"""`veil quote` against a real S3 endpoint (moto server): dimensions from headers only."""

from __future__ import annotations

import json
import zipfile

from conftest import count_s3_get_bytes
from PIL import Image

from jobs.cli import main


def test_quote_reads_only_image_headers(shared_dir, s3fs_client, s3_endpoint, tmp_path, capsys):
    # the 12 largest plate photos (0.9-1.2 MB, 1920x1080 and more), like street-view frames
    files = sorted((shared_dir / "eval/plates/images").iterdir(), key=lambda p: -p.stat().st_size)[:12]
    bucket = "quote-headers"
    s3fs_client.mkdir(bucket)
    for p in files[:8]:
        s3fs_client.put(str(p), f"{bucket}/raw/cam1/{p.name}")
    with zipfile.ZipFile(tmp_path / "drive.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for p in files[8:]:
            z.write(p, f"seq/{p.name}")
        z.writestr("seq/notes.txt", "not an image")
    s3fs_client.put(str(tmp_path / "drive.zip"), f"{bucket}/raw/drive.zip")
    total_bytes = sum(p.stat().st_size for p in files) + (tmp_path / "drive.zip").stat().st_size
    megapixels = sum(Image.open(p).size[0] * Image.open(p).size[1] for p in files) / 1e6

    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    seen = count_s3_get_bytes(opts)
    pricing = tmp_path / "pricing.json"
    pricing.write_text('{"credits_per_image": 0.5, "credits_per_megapixel": 1.0}')
    capsys.readouterr()
    assert main(["quote", f"s3://{bucket}/raw/", "--json", "--pricing", str(pricing),
                 *[f"--storage-option={k}={v}" for k, v in opts.items()]]) == 0
    text = capsys.readouterr().out
    quote = json.loads(text[text.index("{"):])
    assert (quote["items"], quote["images"], quote["not_billable"]) == (13, 12, 1)
    assert abs(quote["megapixels"] - megapixels) < 0.01
    assert abs(quote["credits"] - (12 * 0.5 + megapixels)) < 0.01
    assert set(quote["by_prefix"]) == {"cam1", "drive.zip"} and quote["by_prefix"]["cam1"]["images"] == 8
    share = seen["bytes"] / total_bytes
    print(f"quote read {seen['bytes']} of {total_bytes} bytes ({share:.3f}) in {seen['calls']} GETs")
    assert seen["bytes"] < 0.05 * total_bytes  # headers (and the zip's directory), not the photos
