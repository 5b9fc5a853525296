"""The `veil` command line. Options keep the seed APIs' names; `--a-b` and `--a_b` are the same."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from jobs.spec import SpecError, build_spec
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
    for cls, default in (("face", 0.5), ("license-plate", 0.5), ("person", 0.4), ("vehicle", 0.4)):
        _opt(p, f"--{cls}-threshold", type=float, help=f"minimum score 0..1 (default {default})")
    for cls, default in (("face", "0.35"), ("license-plate", "0.5"), ("person", "95"), ("vehicle", "61")):
        _opt(p, f"--kernel-size-{cls}", type=float,
             help=f"blur/pixel kernel: < 1 = fraction of the object's shorter side, >= 1 = pixels (default {default})")
    _opt(p, "--quality", type=int, help="JPEG/WebP quality 0..100 (default 90)")
    _opt(p, "--compress-level", type=int, help="PNG compression 0..9 (default 5)")
    _opt(p, "--storage-option", type=_storage_option, action="append", dest="storage_option",
         metavar="KEY=VALUE", help="fsspec option for remote URLs, e.g. endpoint_url=http://127.0.0.1:9000, anon=true")
    _opt(p, "--models", help="extra model catalog (YAML/JSON) to add to the built-in one")
    _opt(p, "--device", choices=["auto", "cpu", "cuda"],
         help="where detection runs (default auto: cuda if the cluster has GPUs)")
    _opt(p, "--det-max-side", type=int, help="longer side of the detection copy in px (default 2048)")
    _opt(p, "--max-pixels", type=int, help="images with more pixels fail as TOO_LARGE (default 250000000)")
    _opt(p, "--batch-size", type=int, help="images per detection batch (default 8)")
    _opt(p, "--detect-actors", type=int, help="number of detection actors (default: from the cluster's resources)")


def spec_fields(args: argparse.Namespace, inputs: list[str], output: str) -> dict:
    """Spec fields from a spec file (if any) overridden by the flags that were given."""
    fields: dict = {}
    if getattr(args, "spec", None):
        fields.update(yaml.safe_load(args.spec.read_text()) or {})
    fields.update(inputs=inputs, output=output)
    skip = {"command", "spec", "paths", "storage_option", "func"}
    for key, value in vars(args).items():
        if key not in skip and value is not None:
            fields[key] = value
    if args.storage_option:
        fields["storage_options"] = {**fields.get("storage_options", {}), **dict(args.storage_option)}
    return fields


def cmd_run(args: argparse.Namespace) -> int:
    from jobs.report import summary_text
    from jobs.run import run_job

    if len(args.paths) < 2:
        print("veil run: give at least one INPUT and the OUTPUT", file=sys.stderr)
        return 2
    spec = build_spec(spec_fields(args, args.paths[:-1], args.paths[-1]))
    print(f"job id: {spec.job_id}")
    doc = run_job(spec)
    print(summary_text(doc))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(args.output)


def cmd_models(args: argparse.Namespace) -> int:
    from models.catalog import load_catalog
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
            print(f"{name}: {path}")
        else:
            print(json.dumps({"name": name, "adapter": entry.adapter, "classes": entry.classes,
                              "license": entry.license, "default_for": entry.default_for,
                              "source": entry.source.model_dump(exclude_none=True)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description="Anonymize street-level imagery at scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="anonymize INPUT... into OUTPUT/JOB_ID/")
    run.add_argument("paths", nargs="+", metavar="INPUT... OUTPUT",
                     help="files, folders, globs or fsspec URLs, then the output folder/URL")
    _add_job_options(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="run a job on sample photos shipped by installed packages")
    demo.add_argument("--output", default=None, help="output folder (default ~/.cache/veil/demo/output)")
    demo.set_defaults(func=cmd_demo)

    models = sub.add_parser("models", help="list the model catalog or fetch weights into the cache")
    models.add_argument("action", choices=["list", "fetch"])
    models.add_argument("names", nargs="*", help="model names (default: all)")
    models.add_argument("--models", help="extra catalog file")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, InputError) as exc:
        print(f"veil {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
