"""`veil demo`, `veil models` and `veil eval`: the commands around the job, not of it."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.cli.run import PROFILE_HELP, _opt
from jobs.spec import CPU_BACKEND_HELP, CPU_BACKENDS, SpecError


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


def add_tool_commands(sub) -> None:
    """Register demo, models and eval on the `veil` subparsers."""
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
