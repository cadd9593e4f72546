"""The cluster configs in cluster/: token authentication on everywhere, no token in the files, the
dashboard kept inside the cluster, a pipeline command that parses, and node types that hold its pools.

Nothing here starts a cluster; the files are read as YAML (the launcher config is also checked against
Ray's own schema)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, load_config
from pipeline.run import parse_args

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"

SPARE_CPUS = 2
"""CPUs a run takes besides its pools (Ray Train's controller, Ray Data's file listing)"""

INSTANCE_TYPES = {"m6i.4xlarge": (16, 0), "g5.2xlarge": (8, 1), "g5.12xlarge": (48, 4), "g5.48xlarge": (192, 8),
                  "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8)}
"""(vCPUs, GPUs) of the AWS instance types the launcher config may use"""

# a token-like literal: long hex or base64-ish runs; env names, ids and paths do not look like this
_TOKENISH = re.compile(r"(?<![\w/.-])(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[a-zA-Z])[A-Za-z0-9_-]{32,}(?![\w/.-])")
_AUTH_START = re.compile(r"RAY_AUTH_MODE=token(?:\s+[A-Z_][A-Z0-9_]*=\S+)*\s+ray start\b")


@dataclass(frozen=True)
class Node:
    """One node (or pod) as Ray sees it: what it offers to the scheduler."""
    group: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class Member:
    pool: str
    cpus: float
    gpus: float


def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def _rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]


def _rayjob() -> dict:
    (job,) = [d for d in _rayjob_docs() if d.get("kind") == "RayJob"]
    return job


def _pipeline_config(entrypoint: str) -> Config:
    """The config the entrypoint runs with, resolved and validated exactly as `pipeline.run` does."""
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "pipeline.run"], argv
    args = parse_args(argv[3:])
    return load_config(args.config, args.overrides)


def _members(cfg: Config) -> list[Member]:
    r = cfg.ray
    return ([Member("rollout", r.rollout_cpus, r.rollout_gpus)] * r.rollout_actors
            + [Member("scorer", r.scorer_cpus, r.scorer_gpus)] * (0 if r.colocate else r.scorer_actors)
            + [Member("learner", r.learner_cpus, r.learner_gpus)] * r.learners)


def _check_capacity(nodes: list[Node], members: list[Member]) -> None:
    """The pools fit the worker nodes whatever node Ray places each member on.

    Ray places actors and Ray Train workers by their CPU/GPU demand only (the pipeline asks for no
    custom resource), so a rollout actor may land on a learner node. The checks: every member fits
    some node; the totals (plus spare CPUs) fit; and the placement cannot strand a member: each GPU
    of a node comes with CPUs for the hungriest member, and GPUs suffice even when every fractional
    member sits alone on its own GPU.
    """
    assert nodes, "no worker nodes"
    for m in members:
        assert any(m.cpus <= n.cpus and m.gpus <= n.gpus for n in nodes), f"{m} fits no node: {nodes}"
    need_cpu = sum(m.cpus for m in members) + SPARE_CPUS
    have_cpu = sum(n.cpus for n in nodes)
    assert need_cpu <= have_cpu, f"pools need {need_cpu} CPUs, the workers have {have_cpu}"
    gpu_members = [m for m in members if m.gpus > 0]
    worst_gpus = sum(m.gpus if m.gpus >= 1 else 1 for m in gpu_members)
    have_gpu = sum(n.gpus for n in nodes)
    assert worst_gpus <= have_gpu, f"pools need up to {worst_gpus} GPUs, the workers have {have_gpu}"
    if gpu_members:
        hungriest = max(m.cpus for m in gpu_members)
        for n in nodes:
            assert n.cpus >= n.gpus * hungriest, f"{n}: {n.gpus} GPUs but not {hungriest} CPUs for each"
    if any(m.gpus == 0 for m in members):
        assert any(n.gpus == 0 for n in nodes), "a CPU-only pool on a GPU-only cluster would occupy GPU nodes"


def _no_literal_token(text: str, where: str) -> None:
    """No token-like literal anywhere (comments included), no RAY_AUTH_TOKEN or bearer given a value."""
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _TOKENISH.finditer(line):
            pytest.fail(f"{where}:{lineno}: {m.group()!r} looks like a literal token")
        assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9]", line), \
            f"{where}:{lineno}: RAY_AUTH_TOKEN is given a literal value"
        assert not re.search(r"Bearer\s+[A-Za-z0-9]", line), f"{where}:{lineno}: a literal bearer token"


# ----------------------------------------------------------------------------- the launcher config


def test_launcher_config_is_valid_for_ray():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_launcher(), schema)


def test_launcher_turns_token_auth_on_in_every_start_command():
    cfg = _launcher()
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg[key]
              if "ray start" in c]
    assert len(starts) == 2, starts
    for cmd in starts:
        assert _AUTH_START.search(cmd), f"ray start without RAY_AUTH_MODE=token in its environment: {cmd}"
        assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in cmd, cmd
    setup = " ".join(cfg["setup_commands"])
    secret = cfg["metadata"]["anyflow"]["token_secret"]
    assert f"get-secret-value --region {cfg['provider']['region']} --secret-id {secret}" in setup
    assert "umask 077" in setup and "> ~/.ray/auth_token" in setup  # the token file is private to the user
    _no_literal_token(LAUNCHER.read_text(), LAUNCHER.name)


def test_launcher_keeps_the_dashboard_inside():
    cfg = _launcher()
    (head,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in " ".join(cfg["head_start_ray_commands"])
    for rule in cfg["provider"]["security_group"]["IpPermissions"]:
        assert (rule["FromPort"], rule["ToPort"]) == (22, 22), f"only SSH may be opened: {rule}"
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule["IpRanges"]), rule
    assert cfg["provider"].get("use_internal_ips") is True


def _launcher_nodes(cfg: dict, count: str) -> list[Node]:
    nodes = []
    for name, nt in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        res = nt["resources"]
        cpus, gpus = INSTANCE_TYPES[nt["node_config"]["InstanceType"]]
        assert res.get("CPU", cpus) <= cpus and res.get("GPU", gpus) <= gpus, f"{name} offers more than it has"
        nodes += [Node(name, res.get("CPU", cpus), res.get("GPU", gpus))] * nt[count]
    return nodes


def test_launcher_node_types_hold_the_pipeline_pools():
    cfg = _launcher()
    pipeline_cfg = _pipeline_config(cfg["metadata"]["anyflow"]["entrypoint"])
    assert pipeline_cfg.ray.backend == "ray"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}, "nothing of the pools may land on the head"
    members = _members(pipeline_cfg)
    _check_capacity(_launcher_nodes(cfg, "min_workers"), members)  # runs without waiting for scale-up
    _check_capacity(_launcher_nodes(cfg, "max_workers"), members)
    assert sum(nt.get("max_workers", 0) for nt in cfg["available_node_types"].values()) <= cfg["max_workers"]
    assert pipeline_cfg.run.output_dir.startswith("/mnt/anyflow/"), "the run folder must be the shared mount"


# ----------------------------------------------------------------------------- the KubeRay RayJob


def _pod_templates(job: dict) -> dict[str, dict]:
    spec = job["spec"]["rayClusterSpec"]
    out = {"head": spec["headGroupSpec"]["template"], "submitter": job["spec"]["submitterPodTemplate"]}
    out.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    return out


def test_rayjob_turns_token_auth_on_in_every_container():
    job = _rayjob()
    spec = job["spec"]["rayClusterSpec"]
    auth = spec["authOptions"]
    assert auth["mode"] == "token"
    templates = _pod_templates(job)
    assert len(spec["workerGroupSpecs"]) == 2 and set(templates) >= {"head", "submitter", "rollout", "learner"}
    for name, tpl in templates.items():
        containers = tpl["spec"]["containers"] + tpl["spec"].get("initContainers", [])
        for c in containers:
            env = {e["name"]: e for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}/{c['name']}: RAY_AUTH_MODE"
            token = env.get("RAY_AUTH_TOKEN")
            assert token is not None and "value" not in token, f"{name}/{c['name']}: RAY_AUTH_TOKEN must come from a Secret"
            ref = token["valueFrom"]["secretKeyRef"]
            assert ref == {"name": auth["secretName"], "key": "auth_token"}, f"{name}/{c['name']}: {ref}"
    for doc in _rayjob_docs():
        assert doc["kind"] != "Secret", "the token Secret is created outside this file"
    _no_literal_token(RAYJOB.read_text(), RAYJOB.name)


def test_rayjob_keeps_the_dashboard_inside():
    docs = _rayjob_docs()
    head = _rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    for doc in docs:
        assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), doc["kind"]
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for name, tpl in _pod_templates(_rayjob()).items():
        labels = tpl.get("metadata", {}).get("labels", {})
        assert selector.items() <= labels.items(), f"{name} pods are not covered by the NetworkPolicy"
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer, f"no address ranges may reach the Ray pods: {peer}"


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _rayjob_nodes(job: dict, count: str) -> list[Node]:
    nodes = []
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        params = group.get("rayStartParams") or {}
        (ray_container,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
        limits = ray_container["resources"]["limits"]
        pod_cpus, pod_gpus = _quantity(limits["cpu"]), _quantity(limits.get("nvidia.com/gpu", 0))
        cpus = _quantity(params.get("num-cpus", pod_cpus))
        gpus = _quantity(params.get("num-gpus", pod_gpus))
        assert cpus <= pod_cpus and gpus <= pod_gpus, f"{group['groupName']} offers Ray more than its pod has"
        nodes += [Node(group["groupName"], cpus, gpus)] * group[count]
    return nodes


def test_rayjob_worker_groups_hold_the_pipeline_pools():
    job = _rayjob()
    pipeline_cfg = _pipeline_config(job["spec"]["entrypoint"])
    assert pipeline_cfg.ray.backend == "ray"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0" and head.get("num-gpus") == "0", "nothing of the pools may land on the head"
    members = _members(pipeline_cfg)
    for count in ("replicas", "minReplicas", "maxReplicas"):
        _check_capacity(_rayjob_nodes(job, count), members)
    # the run folder is on the shared volume, mounted on every Ray pod
    out = Path(pipeline_cfg.run.output_dir)
    for name, tpl in _pod_templates(job).items():
        if name == "submitter":
            continue
        pvcs = {v["name"] for v in tpl["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        (c,) = [c for c in tpl["spec"]["containers"] if c["name"].startswith("ray-")]
        assert any(v["name"] in pvcs and out.is_relative_to(v["mountPath"]) for v in c.get("volumeMounts", [])), \
            f"{name}: run.output_dir {out} is not on a shared volume"


# ----------------------------------------------------------------------------- the checks themselves


def test_capacity_check_refuses_what_does_not_fit():
    gpu_node = Node("g", 8, 1)
    with pytest.raises(AssertionError, match="fits no node"):
        _check_capacity([gpu_node], [Member("learner", 8, 2)])
    with pytest.raises(AssertionError, match="GPUs"):  # two half-GPU actors may each take a GPU of their own
        _check_capacity([gpu_node, gpu_node], [Member("rollout", 1, 0.5)] * 2 + [Member("learner", 1, 1)])
    with pytest.raises(AssertionError, match="CPUs for each"):
        _check_capacity([Node("big", 10, 4)] * 2, [Member("learner", 4, 1)] * 4)
    _check_capacity([Node("big", 24, 4)] * 2, [Member("learner", 4, 1)] * 4)


def test_literal_token_check_catches_tokens():
    with pytest.raises(pytest.fail.Exception):
        _no_literal_token("value: 3f1c0e9a8b7d6c5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e", "x")
    with pytest.raises(AssertionError):
        _no_literal_token("export RAY_AUTH_TOKEN=abc", "x")
    _no_literal_token("RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token ray start", "x")
    _no_literal_token("secretKeyRef: {name: anyflow-ray-auth, key: auth_token}", "x")
