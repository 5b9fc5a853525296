"""cluster/: every YAML parses (the launcher config against Ray's own schema), and the image, the Ray
version, the entrypoint and the GPU counts agree across the configs, the Dockerfile and the README."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser, spec_fields
from jobs.spec import build_spec

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REPO = CLUSTER.parent


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())


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
    image = aws["docker"]["image"]
    assert image.endswith(":" + _version())
    assert {c["image"] for _, _, c in _pods(rayjob)} == {image}
    assert f"docker build -f cluster/Dockerfile -t {image} ." in readme
    assert f'org.opencontainers.image.version="{_version()}"' in dockerfile


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
    assert "kubectl apply -f cluster/kuberay-rayjob.yaml" in readme and "ray up cluster/aws.yaml" in readme
