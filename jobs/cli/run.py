"""`veil run` and `veil bench`: the job options (shared with `veil quote` and `veil submit -- run ...`;
`veil bench` takes some of them), the JobSpec they make, and the commands. Options keep the seed
APIs' names; `--a-b` and `--a_b` are the same."""

from __future__ import annotations

import argparse
import json
import signal
from contextlib import contextmanager
from pathlib import Path

import yaml

from jobs.cli.help import sectioned
from jobs.spec import CPU_BACKEND_HELP, CPU_BACKENDS, JobSpec, SpecError, build_spec
from jobs.submit import RUN_CONTROLS


def _opt(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Register --name-with-dashes and --name_with_underscores as one option."""
    spellings = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    parser.add_argument(*spellings, **kwargs)


def _storage_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--storage-option takes key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value) if value else ""


def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job-id", help="job id (default: generated, e.g. 20261125-101500-a1b2c3)")
    p.add_argument("--spec", type=Path, help="YAML/JSON file with job options; flags override it")
    p.add_argument("--spec-json", type=json.loads, metavar="JSON",
                   help="job options as one JSON object, over --spec's; flags override it (how `veil submit` "
                        "and `veil serve --ray-address` send a job to the cluster)")
    for cls in ("face", "license-plate", "person", "vehicle"):
        _opt(p, f"--{cls}", action="store_true", default=None,
             help=f"anonymize {cls.replace('-', ' ')}s (no class flag: faces and license plates)")
    _opt(p, "--method", choices=["blur", "pixelate", "blacken", "detect"],
         help="blur (default) | pixelate | blacken | detect (masks and metadata only)")
    _opt(p, "--bbox", action="store_true", default=None, help="anonymize the whole box, not the inscribed ellipse")
    for cls in ("face", "license-plate", "person", "vehicle"):
        _opt(p, f"--{cls}-threshold", type=float,
             help="minimum score 0..1 for every size (default: the profile's thresholds by size)")
    for cls, default in (("face", "0.95"), ("license-plate", "0.5"), ("person", "95"), ("vehicle", "61")):
        _opt(p, f"--kernel-size-{cls}", type=float,
             help=f"blur/pixel kernel: < 1 = fraction of the object's shorter side, >= 1 = pixels (default {default})")
    for cls, default in (("face", "0.0: a hard edge"), ("license-plate", "0.3")):
        _opt(p, f"--{cls}-anonymization-gradient-start", type=float,
             help=f"feathered edge: full strength deeper than this fraction of the shape's radius (default {default})")
        _opt(p, f"--{cls}-anonymization-gradient-stop", type=float,
             help="feathered edge: no effect at this depth, 0 = the shape's edge (default 0.0)")
    _opt(p, "--shape-scale-face", type=float,
         help="a face's anonymized shape is its box scaled by this about its centre, 1..3 (default 1.3)")
    _opt(p, "--ignores", type=json.loads, metavar="JSON",
         help='areas left untouched: [{"topLeftX": 0, "topLeftY": 0, "width": 100, "height": 50}] (pixels)')
    _opt(p, "--debug", action="store_true", default=None, help="draw detection boxes on the output")
    _opt(p, "--score", action="store_true", default=None, help="with --debug: draw the scores too")
    _opt(p, "--save-mask", choices=["all", "binary", "instance"], help="write masks/binary and/or masks/instance PNGs")
    _opt(p, "--mask-scale", type=int, help="mask size in percent of the image, 0..100 (default 100)")
    _opt(p, "--save-metadata", action="store_true", default=None,
         help="write metadata/<path>.json per image (always on with --method detect)")
    _opt(p, "--strip-metadata", choices=["none", "gps", "all"],
         help="remove GPS tags or all EXIF/XMP/IPTC from the outputs (default none; the ICC profile stays)")
    _opt(p, "--quality", type=int, help="JPEG/WebP quality 0..100 (default 90)")
    _opt(p, "--compress-level", type=int, help="PNG compression 0..9 (default 5)")
    _opt(p, "--format", metavar="whole|auto|panorama|JSON",
         help="tiling (default auto): auto = each model's catalog tiling, and images that are 360-degree "
              "equirectangular panoramas (XMP GPano, or 2:1 and >= 4000 px wide) as panorama; whole = no tiles; "
              "panorama = wrap around the left/right seam (a strip of 1/8 of the width, copied from the left "
              "edge, searched past the right one) plus square tiles for fixed-size models; "
              '\'{"number": [nx, ny], "overlap": [ox, oy]}\' = nx x ny tiles (1..32) overlapping by a fraction '
              "0..0.5 of a tile, for every model")
    _opt(p, "--storage-option", type=_storage_option, action="append", dest="storage_option",
         metavar="KEY=VALUE", help="fsspec option for remote URLs, e.g. endpoint_url=http://127.0.0.1:9000, anon=true")
    _opt(p, "--models", help="extra model catalog (YAML/JSON): models and profiles added to the built-in ones")
    _opt(p, "--profile", help=PROFILE_HELP)
    _opt(p, "--detect-models", help="comma-separated catalog models to run instead of a profile's, "
                                     "e.g. centerface (see `veil models list`)")
    _opt(p, "--device", choices=["auto", "cpu", "cuda"],
         help="where detection runs (default auto: cuda if the cluster has GPUs)")
    _opt(p, "--cpu-backend", choices=list(CPU_BACKENDS), help=CPU_BACKEND_HELP)
    _opt(p, "--det-max-side", type=int, help="longer side of the detection copy in px (default 2048)")
    _opt(p, "--max-pixels", type=int, help="images with more pixels fail as TOO_LARGE (default 250000000)")
    _opt(p, "--batch-size", type=int, help="images per detection batch (default 8)")
    _opt(p, "--detect-actors", type=int, help="number of detection actors (default: from the cluster's resources)")
    _add_archive_options(p)
    _add_video_options(p)
    _add_billing_options(p)


def _add_video_options(p: argparse.ArgumentParser) -> None:
    """Video flags (issue 21)."""
    _opt(p, "--tracking", action="store_true", default=None,
         help="link a video's detections over frames and blur faces missed for up to 5 frames (default True)")
    _opt(p, "--no-tracking", dest="tracking", action="store_false", default=None,
         help="each video frame on its own detections only (Celantur's no-object-tracking; default True: tracking)")
    _opt(p, "--detect-every", type=int, help="detect on every Nth video frame; tracking fills the rest (default 1)")
    _opt(p, "--crf", type=int, help="video quality, constant rate factor 0..51 (default 23; lower = better)")
    _opt(p, "--keep-bit-rate", action="store_true", default=None,
         help="encode videos at their source bit rate instead of --crf")
    _opt(p, "--video-segment-seconds", type=float,
         help="videos of 1.5 segments or more are cut at keyframes into segments of about this many seconds, "
              "run in parallel and joined by stream copy; 0 = never (default 20)")


def _add_billing_options(p: argparse.ArgumentParser) -> None:
    """Credits, cap and notification (issue 7)."""
    _opt(p, "--pricing", help="pricing table (YAML/JSON) laid over the default one (jobs/pricing.yaml)")
    _opt(p, "--max-credits", type=float,
         help="hard cap on the credits the job charges; items past it are skipped with BUDGET_EXCEEDED")
    _opt(p, "--webhook", help="http(s) URL that receives the job report (POST) when the job awaits approval or ends")
    _opt(p, "--web-auth-header-name", help="header sent with the webhook, e.g. Authorization")
    _opt(p, "--web-auth-header-value", help="its value (never logged nor stored in job.json)")


def _add_run_controls(p: argparse.ArgumentParser) -> None:
    _opt(p, "--approve", action="store_true", help="run even if the quote is at or over the auto-approve limit")
    _opt(p, "--auto-approve-below", type=float,
         help="jobs quoted at this many credits or more wait for approval (default: the pricing table's; "
              "none = always approve)")
    _opt(p, "--retry-failed", action="store_true", help="when resuming a job id, process its failed items again")
    _opt(p, "--allow-spec-change", action="store_true",
         help="resume a job id even with options that change what items become (thresholds, method, models...): "
              "items finished earlier keep their results; without it such a resume is refused")


PROFILE_HELP = ("detection profile (default balanced): fast = deface's recall at 3x its speed; balanced = more "
                "faces than deface at every size, plates >= 0.99; thorough = the most recall, whatever it costs "
                "(models/catalog.yaml, README \"Detection quality\")")
BENCH_JOB_OPTIONS = ("profile", "detect_models", "face_threshold", "license_plate_threshold", "person_threshold",
                     "vehicle_threshold", "cpu_backend", "det_max_side", "detect_actors")
EXIT_AWAITING_APPROVAL = 3  # `veil run` stopped with a quote: not an error, not done either


def _add_archive_options(p: argparse.ArgumentParser) -> None:
    """Archive flags (issue 4): nesting, password, and the limits that stop zip bombs."""
    _opt(p, "--archive-depth", type=int,
         help="levels of archives expanded: 1 = archives in the input (default), 2 = also archives "
              "inside them, 0 = archives are skipped")
    _opt(p, "--archive-password", help="password for encrypted archive members (without it they fail ENCRYPTED)")
    _opt(p, "--archive-password-file", help="file whose first line is the archive password (kept out of shell history)")
    _opt(p, "--max-member-bytes", type=int,
         help="largest uncompressed archive member in bytes; larger ones fail TOO_LARGE (default 2147483648)")
    _opt(p, "--max-archive-bytes", type=int,
         help="most uncompressed bytes taken from one archive; members past it fail TOO_LARGE "
              "(default 1099511627776 = 1 TiB)")
    _opt(p, "--repack", choices=["none", "zip"],
         help="zip: also write the anonymized members of each input archive into one zip under "
              "OUTPUT/JOB_ID/archives/ (archive in, archive out; only members that ended done) (default none)")
    _opt(p, "--max-compression-ratio", type=float,
         help="largest uncompressed/compressed size ratio of a member of 1 MiB or more; "
              "higher ones fail TOO_LARGE as likely bombs (default 100)")


def spec_fields(args: argparse.Namespace, inputs: list[str], output: str) -> dict:
    """Spec fields from a spec file (if any), then --spec-json's (if any), overridden by the flags that
    were given."""
    fields: dict = {}
    if getattr(args, "spec", None):
        try:
            loaded = yaml.safe_load(args.spec.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"spec: cannot read {args.spec}: {getattr(exc, 'strerror', None) or exc}") from None
        if not isinstance(loaded, (dict, type(None))):
            raise SpecError(f"spec: {args.spec} must hold a mapping of options (YAML or JSON)")
        fields.update(loaded or {})
    if getattr(args, "spec_json", None) is not None:
        if not isinstance(args.spec_json, dict):
            raise SpecError("spec-json: give one JSON object of job options")
        fields.update(args.spec_json)

    fields.update(inputs=inputs, output=output)
    skip = {"command", "spec", "paths", "inputs", "storage_option", "func", "output", "json", "input_list",
            *RUN_CONTROLS}
    for key, value in vars(args).items():
        if key not in skip and value is not None:
            fields[key] = value
    if args.storage_option:
        fields["storage_options"] = {**fields.get("storage_options", {}), **dict(args.storage_option)}
    fields.pop("spec_json", None)  # read above, under --spec's fields
    return fields


def cmd_run(args: argparse.Namespace) -> int:
    from jobs.progress import quiet_ray
    from jobs.run import run_job

    spec = run_spec(args)
    print(f"job id: {spec.job_id}")
    with cancel_on_sigterm(), quiet_ray():
        doc = run_job(spec, approve=args.approve, auto_approve_below=args.auto_approve_below,
                      retry_failed=args.retry_failed, bar=None, allow_spec_change=args.allow_spec_change)
    return print_outcome(doc)


def print_outcome(doc: dict) -> int:
    from jobs.quote import quote_text
    from jobs.report import summary_text

    if doc["status"] == "awaiting_approval":
        print(quote_text(doc["quote"]))
        print(f"job {doc['job_id']}: awaiting approval - {doc['description']}")
        return EXIT_AWAITING_APPROVAL
    print(summary_text(doc))
    return 0


@contextmanager
def cancel_on_sigterm():
    """SIGTERM (Ray's job stop, kill, Kubernetes) ends the job as `cancelled`, like Ctrl-C."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_bench(args: argparse.Namespace) -> int:
    from jobs.bench import format_bench, run_bench
    from operators.items import kind_of

    fields = {c: True for c in (args.classes or "").replace("-", "_").split(",") if c}
    fields.update({k: v for k in BENCH_JOB_OPTIONS if (v := getattr(args, k)) is not None})
    if Path(args.images_dir).is_file() and kind_of(args.images_dir) == "video":
        from jobs.bench_video import format_video_bench, run_video_bench

        result = run_video_bench(args.images_dir, fields, args.json, peer=not args.no_peer)
        print(format_video_bench(result))
        if args.json:
            print(f"written: {args.json}")
        return 0
    result = run_bench(args.images_dir, fields, args.json, peer=not args.no_peer, repeat=args.repeat,
                       pass_through_dir=args.pass_through, labels=args.labels)
    print(format_bench(result))
    if args.json:
        print(f"written: {args.json}")
    return 0


def add_run_commands(sub) -> None:
    """Register `run` and `bench` on the `veil` subparsers."""
    run = sub.add_parser("run", help="anonymize INPUT... into OUTPUT/JOB_ID/",
                         usage="veil run INPUT... OUTPUT [options]",
                         description="Anonymize INPUT... into OUTPUT/JOB_ID/ (images, manifest, job.json).",
                         epilog="Every --a-b option may be written --a_b. Options can also come from --spec FILE.")
    run.add_argument("paths", nargs="+", metavar="INPUT... OUTPUT",
                     help="files, folders, globs or fsspec URLs, then the output folder/URL")
    _opt(run, "--input-list", action="append", metavar="FILE",
         help="inputs named by a list, not listed: .txt (one URL a line) or .csv/.parquet (a url column, optional "
              "member, rel_path, size); repeatable. An S3 Inventory manifest.json is given as an INPUT")
    _add_job_options(run)
    _add_run_controls(run)
    sectioned(run)  # the help in sections, with units and JobSpec's defaults
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="throughput: pipeline vs bare loop vs codec floor vs deface, one run")
    bench.add_argument("images_dir", help="a folder of images, or one video file (frames/s and time per stage)")
    _opt(bench, "--classes", help="comma-separated classes, e.g. face or face,license-plate,person,vehicle "
                                  "(default: the job default)")
    bench.add_argument("--json", help="write the results to this file")
    _opt(bench, "--no-peer", action="store_true", help="skip deface even when it is installed")
    _opt(bench, "--repeat", type=int, default=1, help="use every image N times under new names (default 1)")
    _opt(bench, "--pass-through", metavar="DIR",
         help="also run a set with nothing to anonymize and compare its speed with the full pass")
    _opt(bench, "--profile", help=PROFILE_HELP)
    _opt(bench, "--detect-models", help="comma-separated catalog models to run instead of a profile's")
    for cls in ("face", "license-plate", "person", "vehicle"):
        _opt(bench, f"--{cls}-threshold", type=float, help=f"minimum {cls.replace('-', ' ')} score 0..1")
    _opt(bench, "--cpu-backend", choices=list(CPU_BACKENDS), help=CPU_BACKEND_HELP)
    _opt(bench, "--det-max-side", type=int, help="longer side of the detection copy in px (default 2048)")
    _opt(bench, "--detect-actors", type=int, help="detection actors in the pipeline run (default: from the CPUs)")
    _opt(bench, "--labels", metavar="FILE",
         help="ground truth (annotations.json, shared eval format) to score the pipeline's and the peer's "
              "detections against (default: IMAGES_DIR/../annotations.json when IMAGES_DIR is a set's images/)")
    bench.set_defaults(func=cmd_bench)


def parse_run(argv: list[str]) -> argparse.Namespace:
    """`veil run`'s arguments parsed by its own parser (what `veil submit -- run ...` checks locally)."""
    parser = argparse.ArgumentParser(prog="veil")
    add_run_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["run", *argv])


def run_spec(args: argparse.Namespace) -> JobSpec:
    """The JobSpec of parsed `veil run` arguments (what cmd_run runs and `veil submit` sends)."""
    lists = [f"list:{f}" for f in getattr(args, "input_list", None) or []]  # operators/input_lists.py reads them
    if len(args.paths) < 2 and not (lists and args.paths):
        raise SpecError("run: give at least one INPUT (or --input-list FILE) and the OUTPUT")
    return build_spec(spec_fields(args, args.paths[:-1] + lists, args.paths[-1]))
