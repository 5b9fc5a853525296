"""Fill in the parameters of a cluster config template: the image every node runs and, on AWS, the AMI.

    python cluster/render.py aws --image IMAGE --ami AMI_ID [-o FILE]      # cluster/aws.yaml
    python cluster/render.py kuberay --image IMAGE [-o FILE]               # cluster/kuberay-rayjob.yaml

The templates hold `${VEIL_IMAGE}` and `${AWS_AMI_ID}` rather than made-up values, so a config that was
not rendered fails at once (Ray and kubectl refuse `${...}`) instead of pulling an image that is not yours.
A missing or malformed value is refused, naming the option. Standard library only: runs before installing.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

CLUSTER = Path(__file__).resolve().parent
TEMPLATES = {"aws": CLUSTER / "aws.yaml", "kuberay": CLUSTER / "kuberay-rayjob.yaml"}
# a container image reference: [registry[:port]/]path[:tag][@sha256:digest], as Docker parses it
IMAGE = re.compile(r"^(?:[a-zA-Z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*"
                   r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")
AMI = re.compile(r"^ami-(?:[0-9a-f]{8}|[0-9a-f]{17})$")


class RenderError(ValueError):
    """A parameter is missing or malformed; the message names the option."""


def render(target: str, image: str | None, ami: str | None = None) -> str:
    """The text of TEMPLATES[target] with its parameters filled in."""
    if target not in TEMPLATES:
        raise RenderError(f"target: {target!r} is not one of {sorted(TEMPLATES)}")
    if not image or not IMAGE.match(image):
        raise RenderError(f"--image: give the image you built and pushed, e.g. "
                          f"123456789012.dkr.ecr.us-west-2.amazonaws.com/veil:0.1.0 (got {image!r})")
    values = {"VEIL_IMAGE": image}
    text = TEMPLATES[target].read_text()
    if "${AWS_AMI_ID}" in text:
        if not ami or not AMI.match(ami):
            raise RenderError(f"--ami: give the AMI id for your region, ami- and 8 or 17 hex digits (got {ami!r}); "
                              "cluster/README.md shows how to look it up")
        values["AWS_AMI_ID"] = ami
    # only ${NAME} of the known parameters: the configs hold shell variables too ($RAY_HEAD_IP)
    return re.sub(r"\$\{(VEIL_IMAGE|AWS_AMI_ID)\}", lambda m: values[m.group(1)], text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python cluster/render.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(TEMPLATES), help="which config: aws.yaml or kuberay-rayjob.yaml")
    parser.add_argument("--image", help="the image every node runs (built from cluster/Dockerfile, pushed)")
    parser.add_argument("--ami", help="aws: the AMI of the nodes (Deep Learning Base GPU AMI)")
    parser.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        text = render(args.target, args.image, args.ami)
    except RenderError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 2
    if args.output:
        args.output.write_text(text)
        print(f"written: {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
