"""Cluster configs under clusters/: the launcher configs validate against the schema shipped in the
installed Ray wheel, the KubeRay manifests request GPUs, pin images and expose nothing, the job
runtime env keeps data, results and secrets out of the upload, and (slow) a real local head refuses
job-API requests without the token, runs a submitted job and is stopped without leaking processes.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHER_CONFIGS = [CLUSTERS / "aws-gpu.yaml", CLUSTERS / "gcp-gpu.yaml"]
KUBERAY_DIR = CLUSTERS / "kuberay"
RUNTIME_ENV = CLUSTERS / "runtime_env.yaml"
KUBERAY_RUNTIME_ENV = KUBERAY_DIR / "runtime_env.yaml"
LOCAL = CLUSTERS / "local"

RAY_VERSION = ray.__version__  # "2.60.0"
PY_TAG = "py311"  # the images' Python: the project's venv (and CI) run 3.11
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RAY_BIN = Path(sys.executable).with_name("ray")


def _load(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def _load_all(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _walk(obj, path=()):
    """Yield (path, value) for every node of a parsed YAML document."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, path + (i,))


def _pyproject_dependencies() -> list[str]:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def _is_ray_requirement(req: str) -> bool:
    return re.match(r"^ray(\[|[<>=!~ ]|$)", req) is not None


# ---------------------------------------------------------------------------------------------
# (a) Ray cluster launcher configs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


@pytest.mark.parametrize("config_path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_validates_against_ray_schema(config_path: Path, ray_schema: dict):
    config = _load(config_path)
    errors = sorted(jsonschema.Draft7Validator(ray_schema).iter_errors(config), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)

    # Ray's own loader: fills in the provider defaults and validates the merged config again.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


@pytest.mark.parametrize("config_path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_has_cpu_head_and_gpu_workers(config_path: Path):
    config = _load(config_path)
    node_types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in node_types
    workers = {name: nt for name, nt in node_types.items() if name != head}
    assert workers, "no worker node type"

    def has_gpu(nt: dict) -> bool:
        nc = nt["node_config"]
        if nt.get("resources", {}).get("GPU", 0) > 0 or nc.get("guestAccelerators"):
            return True
        # AWS: GPU counts are auto-detected from GPU instance families (g4dn, g5, g6, p3, p4d, ...).
        return re.match(r"^(g\d|p\d)", nc.get("InstanceType", "")) is not None

    gpu_workers = [n for n, nt in workers.items() if has_gpu(nt)]
    assert gpu_workers, f"no GPU worker type in {sorted(workers)}"
    assert not has_gpu(node_types[head]), "the head should be a CPU node"
    for name in gpu_workers:
        nt = workers[name]
        assert 0 <= nt["min_workers"] <= nt["max_workers"] <= config["max_workers"]
        assert nt["max_workers"] >= 2, "--num-workers 2 --use-gpu needs two GPU workers"


@pytest.mark.parametrize("config_path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_keeps_auth_on_and_dashboard_on_loopback(config_path: Path):
    config = _load(config_path)
    head_cmds = " ".join(config["head_start_ray_commands"])
    worker_cmds = " ".join(config["worker_start_ray_commands"])
    start = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(start) == 1
    start_args = shlex.split(start[0].replace(";", " ; "))
    assert "--head" in start_args
    hosts = [a.split("=", 1)[1] for a in start_args if a.startswith("--dashboard-host=")]
    assert hosts and all(h in LOOPBACK for h in hosts), f"dashboard must bind loopback, got {hosts}"
    assert "0.0.0.0" not in yaml.safe_dump(config), "something listens on / admits 0.0.0.0"
    # token auth: mode in every start command and in the container env, token mounted on all nodes
    for cmds in (head_cmds, worker_cmds):
        assert "RAY_AUTH_MODE=token" in cmds
        assert "~/.ray/auth_token" in cmds, "start commands should check that the token is there"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=disabled" not in yaml.safe_dump(config)
    # dashboard Train view
    assert "RAY_TRAIN_ENABLE_STATE_TRACKING=1" in head_cmds


@pytest.mark.parametrize("config_path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_pins_images_to_installed_ray(config_path: Path):
    docker = _load(config_path)["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    assert images
    for image in images:
        repo, _, tag = image.rpartition(":")
        assert repo in ("rayproject/ray", "rayproject/ray-ml"), image
        assert tag.startswith(f"{RAY_VERSION}-{PY_TAG}"), f"{image}: expected Ray {RAY_VERSION}, {PY_TAG}"
        assert "latest" not in tag and "nightly" not in tag
    assert docker["worker_image"].endswith("-gpu") or re.search(r"-cu\d+$", docker["worker_image"])


@pytest.mark.parametrize("config_path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_setup_installs_pyproject_dependencies(config_path: Path):
    setup = " ".join(_load(config_path)["setup_commands"])
    missing = [dep for dep in _pyproject_dependencies() if f'"{dep}"' not in setup]
    assert not missing, f"setup_commands lack pyproject dependencies {missing}"


def _ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return {opt for param in start.params for opt in param.opts}


def test_every_ray_start_flag_exists_in_installed_ray():
    """Catches flags renamed or removed in Ray 2.60 (launcher commands, KubeRay rayStartParams, the
    local recipe)."""
    options = _ray_start_options()
    used: list[tuple[str, str]] = []
    for path in LAUNCHER_CONFIGS:
        config = _load(path)
        for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
            if "ray start" in cmd:
                args = shlex.split(cmd.split("ray start", 1)[1])
                used += [(path.name, a.split("=", 1)[0]) for a in args if a.startswith("--")]
    for where, spec, _ in _ray_cluster_specs():
        groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        used += [(where, f"--{k}") for g in groups for k in g["rayStartParams"]]
    start_sh = (LOCAL / "start_head.sh").read_text()
    used += [("start_head.sh", m) for m in re.findall(r"^\s*(--[a-z-]+)", start_sh, re.M)]
    assert used
    unknown = [(w, f) for w, f in used if f not in options]
    assert not unknown, f"not `ray start` options in Ray {RAY_VERSION}: {unknown}"


def test_aws_security_group_admits_only_the_vpc():
    config = _load(CLUSTERS / "aws-gpu.yaml")
    sg = config["provider"]["security_group"]
    ranges = [r["CidrIp"] for perm in sg["IpPermissions"] for r in perm.get("IpRanges", [])]
    assert ranges
    for cidr in ranges:
        assert cidr != "0.0.0.0/0"
        net = cidr.split("/")[0]
        assert re.match(r"^(10\.|172\.(1[6-9]|2\d|3[01])\.|192\.168\.)", net), f"{cidr} is not private"
    for perm in sg["IpPermissions"]:
        assert not perm.get("Ipv6Ranges"), "no IPv6 (public) ranges"


def test_gcp_nodes_are_tagged_for_the_firewall():
    config = _load(CLUSTERS / "gcp-gpu.yaml")
    for name, nt in config["available_node_types"].items():
        assert "dpaf-ray" in nt["node_config"]["tags"]["items"], name
    worker = config["available_node_types"]["ray_worker_t4"]["node_config"]
    assert {"onHostMaintenance": "TERMINATE"} in worker["scheduling"]


# ---------------------------------------------------------------------------------------------
# (b) KubeRay manifests
# ---------------------------------------------------------------------------------------------

KUBERAY_FILES = sorted(KUBERAY_DIR.glob("*.yaml"))
MANIFESTS = [p for p in KUBERAY_FILES if p.name != "runtime_env.yaml"]
ALLOWED_KINDS = {"RayCluster", "RayJob", "NetworkPolicy", "PersistentVolumeClaim"}


def _docs(path: Path) -> list[dict]:
    docs = _load_all(path)
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), f"{path.name}: not a k8s object"
    return docs


def _ray_cluster_specs() -> list[tuple[str, dict, dict]]:
    """(where, RayClusterSpec, the object holding it) for every cluster the manifests create."""
    out = []
    for path in MANIFESTS:
        for d in _docs(path):
            if d["kind"] == "RayCluster":
                out.append((f"{path.name}:{d['metadata']['name']}", d["spec"], d))
            elif d["kind"] == "RayJob":
                out.append((f"{path.name}:{d['metadata']['name']}.rayClusterSpec", d["spec"]["rayClusterSpec"], d))
    return out


def _pod_templates(spec: dict) -> list[tuple[str, dict]]:
    tpls = [("head", spec["headGroupSpec"]["template"])]
    tpls += [(f"worker:{g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return tpls


def test_kuberay_manifests_exist_and_parse():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob.yaml"} <= names
    kinds = {d["kind"] for p in MANIFESTS for d in _docs(p)}
    assert {"RayCluster", "RayJob"} <= kinds
    for p in MANIFESTS:
        for d in _docs(p):
            assert d["kind"] in ALLOWED_KINDS, f"{p.name}: unexpected {d['kind']}"
            if d["kind"] in ("RayCluster", "RayJob"):
                assert d["apiVersion"] == "ray.io/v1"


def test_kuberay_exposes_nothing():
    for p in MANIFESTS:
        for d in _docs(p):
            # no Service of an exposing type, no Ingress / Gateway objects, no Secret with a value
            assert d["kind"] not in ("Ingress", "Gateway", "HTTPRoute", "Route", "Secret"), p.name
            if d["kind"] == "Service":
                assert d["spec"].get("type", "ClusterIP") == "ClusterIP", p.name
            for path, value in _walk(d):
                if path and path[-1] in ("serviceType", "type") and isinstance(value, str):
                    assert value not in ("LoadBalancer", "NodePort"), f"{p.name}: {'.'.join(map(str, path))}"
                if path and path[-1] == "enableIngress":
                    assert value is not True, f"{p.name}: enableIngress"
                if path and path[-1] in ("hostNetwork", "hostPort"):
                    assert not value, f"{p.name}: {path[-1]}"
    for where, spec, _ in _ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        if "headService" in head:
            assert head["headService"]["spec"].get("type", "ClusterIP") == "ClusterIP", where


def _network_policies(path: Path) -> list[dict]:
    return [d for d in _docs(path) if d["kind"] == "NetworkPolicy"]


def _selects(policy: dict, labels: dict) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def _effective_pod_labels(spec_owner: dict, template: dict, spec: dict) -> dict:
    labels = dict(template.get("metadata", {}).get("labels", {}) or {})
    if spec_owner["kind"] == "RayCluster":  # KubeRay labels every pod with its cluster's name
        labels["ray.io/cluster"] = spec_owner["metadata"]["name"]
    return labels


def test_kuberay_dashboard_on_loopback_or_fenced():
    """Dashboard binds loopback, or (RayJob, whose operator must reach it) stays behind ClusterIP,
    token auth and a NetworkPolicy that selects every pod of the cluster."""
    for path in MANIFESTS:
        for d in _docs(path):
            if d["kind"] not in ("RayCluster", "RayJob"):
                continue
            spec = d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]
            host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0")
            if d["kind"] == "RayCluster":
                assert host in LOOPBACK, f"{path.name}: standalone cluster dashboard must bind loopback"
            policies = _network_policies(path)
            if host not in LOOPBACK:
                assert policies, f"{path.name}: dashboard on {host} without a NetworkPolicy"
            for role, tpl in _pod_templates(spec):
                labels = _effective_pod_labels(d, tpl, spec)
                if policies or host not in LOOPBACK:
                    assert any(_selects(p, labels) for p in policies), f"{path.name}: {role} pods not selected"
            for pol in policies:
                assert "Ingress" in pol["spec"]["policyTypes"]
                for rule in pol["spec"].get("ingress", []):
                    assert rule.get("from"), f"{path.name}: ingress rule open to everyone"
                    for peer in rule["from"]:
                        assert "ipBlock" not in peer, f"{path.name}: ipBlock peer"
                        if "namespaceSelector" in peer:  # cross-namespace only for named pods
                            assert peer.get("podSelector", {}).get("matchLabels"), path.name


def test_kuberay_token_auth_from_secret():
    for where, spec, _ in _ray_cluster_specs():
        assert spec["authOptions"]["mode"] == "token", where
        secret = spec["authOptions"]["secretName"]
        assert spec["rayVersion"] == RAY_VERSION, where
        for role, tpl in _pod_templates(spec):
            env = {e["name"]: e for e in tpl["spec"]["containers"][0].get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", f"{where} {role}"
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": secret, "key": "auth_token"}, f"{where} {role}"
            assert env["RAY_TRAIN_ENABLE_STATE_TRACKING"]["value"] == "1"
    # no literal token anywhere
    for p in KUBERAY_FILES:
        text = p.read_text()
        assert not re.search(r"\b[0-9a-f]{64}\b", text), f"{p.name} contains something token-like"


def _image_ok(image: str) -> bool:
    repo, sep, tag = image.rpartition(":")
    return bool(sep) and "/" not in tag and tag not in ("latest", "nightly") and "latest" not in tag


def test_kuberay_images_pinned_and_gpus_requested():
    images = []
    for p in MANIFESTS:
        for path, value in _walk(_docs(p)):
            if path and path[-1] == "image":
                images.append((p.name, value))
    assert images
    for name, image in images:
        assert "@sha256:" in image or _image_ok(image), f"{name}: unpinned image {image}"
        if image.startswith("rayproject/"):
            assert image.split(":")[1].startswith(f"{RAY_VERSION}-{PY_TAG}"), f"{name}: {image}"

    for where, spec, _ in _ray_cluster_specs():
        gpu_groups = []
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], where
            c = group["template"]["spec"]["containers"][0]
            limits = c["resources"]["limits"]
            if "nvidia.com/gpu" in limits:
                assert int(limits["nvidia.com/gpu"]) >= 1
                assert c["image"].endswith("-gpu") or re.search(r"-cu\d+$", c["image"]), c["image"]
                gpu_groups.append(group)
        assert gpu_groups, f"{where}: no worker group requests nvidia.com/gpu"
        assert max(g["maxReplicas"] for g in gpu_groups) >= 2, where
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {}), f"{where}: GPU head"


def _mounts(tpl: dict) -> dict[str, str]:
    """mountPath -> claimName of PVC-backed mounts of the first container."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in tpl["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
    return {m["mountPath"]: claims[m["name"]]
            for m in tpl["spec"]["containers"][0].get("volumeMounts", []) if m["name"] in claims}


def test_rayjob_runs_tune_py_with_shared_storage():
    jobs = [d for d in _docs(KUBERAY_DIR / "rayjob.yaml") if d["kind"] == "RayJob"]
    assert len(jobs) == 1
    job = jobs[0]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "tune.py"], argv
    assert "--search-space" in argv and argv[argv.index("--search-space") + 1].startswith("search_spaces/")
    out = argv[argv.index("--out") + 1]

    pvcs = {d["metadata"]["name"] for p in MANIFESTS for d in _docs(p) if d["kind"] == "PersistentVolumeClaim"}
    pvc = next(iter(pvcs))
    for role, tpl in _pod_templates(job["rayClusterSpec"]):
        mounts = _mounts(tpl)
        assert any(out.startswith(mp.rstrip("/") + "/") and claim in pvcs for mp, claim in mounts.items()), (
            f"{role}: --out {out} is not on the shared volume ({mounts})")
    # the submitter packages working_dir from the same volume
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    sub_mounts = _mounts(job["submitterPodTemplate"])
    assert any(runtime_env["working_dir"].startswith(mp) and c == pvc for mp, c in sub_mounts.items())
    assert job["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    assert job.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "SidecarMode", "HTTPMode")
    # the standalone cluster mounts it too
    rc = [d for d in _docs(KUBERAY_DIR / "raycluster.yaml") if d["kind"] == "RayCluster"][0]
    for role, tpl in _pod_templates(rc["spec"]):
        assert pvc in _mounts(tpl).values(), role


def test_shared_volume_is_read_write_many():
    pvc = [d for d in _docs(KUBERAY_DIR / "shared-storage.yaml") if d["kind"] == "PersistentVolumeClaim"]
    assert pvc and "ReadWriteMany" in pvc[0]["spec"]["accessModes"]


# ---------------------------------------------------------------------------------------------
# (c) runtime env: validity and what Ray would upload
# ---------------------------------------------------------------------------------------------


def _validate_runtime_env(env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    # RuntimeEnv checks that a local working_dir exists: "." is resolved against the submitter's
    # cwd and the RayJob's path exists only on the shared volume, so check with this checkout.
    RuntimeEnv(**dict(env, working_dir=str(REPO)))  # raises on unknown/ill-typed fields


def test_runtime_envs_are_valid_and_agree():
    base = _load(RUNTIME_ENV)
    k8s = _load(KUBERAY_RUNTIME_ENV)
    rayjob = [d for d in _docs(KUBERAY_DIR / "rayjob.yaml") if d["kind"] == "RayJob"][0]
    job = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    for env in (base, k8s, job):
        _validate_runtime_env(env)
        assert all(isinstance(v, str) for v in env["env_vars"].values())
        assert env["env_vars"]["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
    assert base["working_dir"] == "." and "pip" not in base
    assert k8s["excludes"] == base["excludes"] and job["excludes"] == base["excludes"]
    assert base["env_vars"].items() <= k8s["env_vars"].items()
    assert job["env_vars"] == k8s["env_vars"]
    assert job["pip"] == k8s["pip"] and job.get("config") == k8s.get("config")
    expected = [d for d in _pyproject_dependencies() if not _is_ray_requirement(d)]
    assert k8s["pip"]["packages"] == expected, "kuberay runtime env pip != pyproject dependencies (minus ray)"


WORKING_DIR_FILES = {
    # path: uploaded?
    "tune.py": True,
    "dpaf_ray/__init__.py": True,
    "dpaf_ray/a.py": True,
    "dpaf_ray/data/__init__.py": True,  # a code package named "data" must survive
    "dpaf_ray/data/sources.py": True,
    "search_spaces/tiny.yaml": True,
    "pyproject.toml": True,
    "clusters/runtime_env.yaml": True,
    "runs/x": False,
    "runs/job/release/privacy_report.json": False,
    "sub/runs/y": False,
    "data/y.parquet": False,
    "data/MNIST/raw/train-images-idx3-ubyte": False,
    "elsewhere/table.parquet": False,
    "model.pt": False,
    "checkpoints/gen.pth": False,
    ".env": False,
    ".env.local": False,
    "id_rsa": False,
    "id_rsa.pub": False,
    "id_ed25519": False,
    "cluster.pem": False,
    "tls/server.key": False,
    ".ray/auth_token": False,
    "auth_token": False,
    ".aws/credentials": False,
    "gcp-service-account.json": False,
    ".kube/config": False,
    ".git/config": False,
    ".venv/pyvenv.cfg": False,
    "venv/bin/python": False,
    "__pycache__/tune.cpython-311.pyc": False,
    "bench/results/r.json": False,
}


def _uploaded_files(working_dir: Path, excludes: list[str], include_gitignore: bool) -> set[str]:
    """The files `ray job submit --working-dir` would put in the package, computed by Ray's own
    packaging code (the same create_package the job client uses)."""
    from ray._private.runtime_env.packaging import create_package

    out = working_dir.parent / f"pkg-{uuid.uuid4().hex}.zip"
    create_package(str(working_dir), out, include_gitignore=include_gitignore, excludes=excludes)
    with zipfile.ZipFile(out) as z:
        names = {n for n in z.namelist() if not n.endswith("/")}
    out.unlink()
    return names


@pytest.fixture()
def messy_working_dir(tmp_path: Path) -> Path:
    wd = tmp_path / "wd"
    for rel in WORKING_DIR_FILES:
        f = wd / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    return wd


@pytest.mark.parametrize("env_path", [RUNTIME_ENV, KUBERAY_RUNTIME_ENV], ids=lambda p: str(p.relative_to(CLUSTERS)))
def test_runtime_env_excludes_keep_data_runs_and_secrets_out(env_path: Path, messy_working_dir: Path):
    excludes = _load(env_path)["excludes"]
    # Our excludes alone (no .gitignore, no Ray default excludes) must do the job ...
    uploaded = _uploaded_files(messy_working_dir, excludes, include_gitignore=False)
    expected = {rel for rel, keep in WORKING_DIR_FILES.items() if keep}
    assert uploaded == expected, f"unexpected: {sorted(uploaded - expected)}; missing: {sorted(expected - uploaded)}"

    # ... and with what `ray job submit` adds (Ray's default excludes, .gitignore) nothing changes.
    from ray._private import ray_constants

    (messy_working_dir / ".gitignore").write_text("runs/\n*.pt\n")
    expected_with_gitignore = expected | {".gitignore"}
    uploaded = _uploaded_files(messy_working_dir, ray_constants.get_runtime_env_default_excludes() + excludes, True)
    assert uploaded == expected_with_gitignore


def test_runtime_env_upload_of_this_checkout_is_small():
    """The real checkout, packaged with the real excludes, stays far below Ray's 100 MiB limit and
    contains the entry point and the package."""
    excludes = _load(RUNTIME_ENV)["excludes"]
    with tempfile.TemporaryDirectory() as tmp:
        from ray._private.runtime_env.packaging import create_package

        out = Path(tmp) / "pkg.zip"
        create_package(str(REPO), out, include_gitignore=True, excludes=excludes)
        with zipfile.ZipFile(out) as z:
            names = z.namelist()
        size = out.stat().st_size
    assert any(n.startswith("dpaf_ray/") for n in names)
    assert not any(n.startswith(("runs/", ".git/", ".venv/")) for n in names)
    assert size < 20 * 1024 * 1024, f"working_dir package is {size / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# (d) a real local head: token auth, job submission, clean shutdown (slow)
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of this user in session `sid`."""
    pids = []
    uid = os.getuid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if entry.stat().st_uid != uid:
                continue
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _kill_session(sid: int) -> None:
    """Last-resort cleanup: SIGKILL what is left of the head we started (by session id)."""
    for _ in range(10):
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


class LocalHead:
    def __init__(self, base: Path, dashboard_port: int, sid: int, env: dict[str, str]):
        self.base = base
        self.dashboard_port = dashboard_port
        self.url = f"http://127.0.0.1:{dashboard_port}"
        self.sid = sid
        self.env = env
        self.token = (base / "home" / ".ray" / "auth_token").read_text().strip()

    def request(self, path: str, token: str | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def run(self, args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=REPO, env=env or self.env, capture_output=True, text=True, timeout=timeout)


def _clean_env(base: Path, dashboard_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HOME=str(base / "home"),  # token in <base>/home/.ray/auth_token: the user's ~/.ray is untouched
        DPAF_RAY_STATE_DIR=str(base / "state"),
        DPAF_RAY_TEMP_DIR=str(base / "r"),  # short: Ray's unix socket paths must stay < 108 bytes
        DPAF_RAY_DASHBOARD_PORT=str(dashboard_port),
        DPAF_RAY_NUM_CPUS="2",
        DPAF_RAY_STOP_GRACE_S="5",
        RAY=str(RAY_BIN if RAY_BIN.exists() else shutil.which("ray")),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


@pytest.mark.parametrize("script", ["start_head.sh", "submit.sh", "stop_head.sh"])
def test_local_scripts_are_executable_bash(script: str):
    path = LOCAL / script
    assert os.access(path, os.X_OK), f"{path} is not executable"
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = path.read_text()
    assert "set -euo pipefail" in text
    assert not re.search(r"^\s*(ray|\"\$RAY\"|\$RAY)\s+stop\b", text, re.M), "never `ray stop`: it kills every Ray"
    assert "pkill" not in text and "killall" not in text


def test_local_recipe_commands():
    start = (LOCAL / "start_head.sh").read_text()
    for flag in ("--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", '--port="$GCS_PORT"',
                 '--temp-dir="$TEMP_DIR"', "export RAY_AUTH_MODE=token"):
        assert flag in start, flag
    submit = (LOCAL / "submit.sh").read_text()
    for part in ("RAY_AUTH_MODE=token", "job submit", "--working-dir .", "--runtime-env clusters/runtime_env.yaml",
                 "http://127.0.0.1:8265", "tune.py"):
        assert part in submit, part


def test_start_head_refuses_a_taken_dashboard_port(tmp_path: Path):
    """Fails fast, starts nothing and records nothing when the dashboard port is in use."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = _clean_env(tmp_path, port)
        (tmp_path / "home").mkdir()
        r = subprocess.run([str(LOCAL / "start_head.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=60)
    assert r.returncode != 0 and f"port {port} is taken" in r.stderr
    assert not (tmp_path / "state" / "head.sid").exists()
    assert not (tmp_path / "state" / "head.env").exists()
    # stop_head.sh with nothing recorded is a no-op
    r = subprocess.run([str(LOCAL / "stop_head.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "nothing to stop" in r.stdout


@pytest.fixture(scope="module")
def local_head():
    base = Path(tempfile.mkdtemp(prefix="dpr-", dir="/tmp"))
    (base / "home").mkdir()
    port = _free_port()
    env = _clean_env(base, port)
    sid_file = base / "state" / "head.sid"
    sid = None
    try:
        # The recipe itself offers the `trial_slot` resource tune.py's trials hold (docs/design.md §9).
        started = subprocess.run(
            [str(LOCAL / "start_head.sh")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
        )
        if sid_file.exists():
            sid = int(sid_file.read_text())
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"Dashboard: http://127.0.0.1:{port}" in started.stdout
        assert sid is not None and _session_pids(sid), "no head processes found"
        head = LocalHead(base, port, sid, env)
        deadline = time.time() + 60
        while True:  # the dashboard is up when ray start returns, but be patient
            try:
                if head.request("/api/gcs_healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "dashboard did not come up"
            time.sleep(1)
        yield head
        stopped = subprocess.run([str(LOCAL / "stop_head.sh")], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not _session_pids(sid), f"processes left after stop_head.sh: {_session_pids(sid)}"
        assert not (base / "state" / "head.env").exists()
    finally:
        if sid is None and sid_file.exists():
            sid = int(sid_file.read_text())
        if sid is not None:
            _kill_session(sid)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_local_head_dashboard_is_loopback_only(local_head: LocalHead):
    # bound to 127.0.0.1: the machine's other addresses refuse the connection
    from ray._private.services import get_node_ip_address

    ip = get_node_ip_address()
    if ip in LOOPBACK:
        pytest.skip("no non-loopback address on this machine")
    with socket.socket() as s:
        s.settimeout(3)
        assert s.connect_ex((ip, local_head.dashboard_port)) != 0, f"dashboard reachable on {ip}"


@pytest.mark.slow
def test_job_api_requires_the_token(local_head: LocalHead):
    assert local_head.request("/api/jobs/")[0] == 401
    assert local_head.request("/api/jobs/", token="0" * 64)[0] == 403
    status, body = local_head.request("/api/jobs/", token=local_head.token)
    assert status == 200 and isinstance(json.loads(body), list)
    # health checks stay public (KubeRay probes use them)
    assert local_head.request("/api/gcs_healthz")[0] == 200


@pytest.mark.slow
def test_ray_job_client_needs_auth_mode_token(local_head: LocalHead):
    env = dict(local_head.env)
    env.pop("RAY_AUTH_MODE", None)
    r = local_head.run([env["RAY"], "job", "list", "--address", local_head.url], timeout=120, env=env)
    assert r.returncode != 0 and "Authentication" in (r.stdout + r.stderr)
    env["RAY_AUTH_MODE"] = "token"
    r = local_head.run([env["RAY"], "job", "list", "--address", local_head.url], timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def _job_status(head: LocalHead, submission_id: str) -> str:
    status, body = head.request(f"/api/jobs/{submission_id}", token=head.token)
    assert status == 200, body
    return json.loads(body)["status"]


@pytest.mark.slow
def test_submit_trivial_job(local_head: LocalHead):
    sid = f"trivial-{uuid.uuid4().hex[:8]}"
    env = dict(local_head.env, RAY_JOB_SUBMIT_OPTS=f"--submission-id {sid}")
    r = local_head.run([str(LOCAL / "submit.sh"), "python", "-c", "print('ok')"], timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout.splitlines()
    assert _job_status(local_head, sid) == "SUCCEEDED"
    # the follow-up commands the script prints work as shown, in a shell without RAY_AUTH_MODE
    follow = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("RAY_AUTH_MODE=token")]
    assert any(f"job status {sid}" in ln for ln in follow), r.stdout
    env = {k: v for k, v in local_head.env.items() if k != "RAY_AUTH_MODE"}
    status_cmd = next(ln for ln in follow if "job status" in ln)
    shown = local_head.run(["bash", "-c", status_cmd], timeout=120, env=env)
    assert shown.returncode == 0 and "succeeded" in (shown.stdout + shown.stderr).lower(), shown.stdout + shown.stderr


@pytest.mark.slow
def test_the_recipe_head_offers_the_trial_slot_tune_needs(local_head: LocalHead):
    status, body = local_head.request("/api/cluster_status", token=local_head.token)
    assert status == 200, body
    assert b"trial_slot" in body, body[:2000]


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not (REPO / "tune.py").exists(), reason="tune.py is not written yet")
def test_submit_tune_py(local_head: LocalHead):
    out = local_head.base / "runs" / "job"
    sid = f"tune-{uuid.uuid4().hex[:8]}"
    env = dict(local_head.env, RAY_JOB_SUBMIT_OPTS=f"--submission-id {sid}")
    r = local_head.run(
        [str(LOCAL / "submit.sh"), "python", "tune.py", "--search-space", "search_spaces/tiny.yaml",
         "--out", str(out)],
        timeout=3300, env=env,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    assert _job_status(local_head, sid) == "SUCCEEDED"
    assert (out / "release" / "privacy_report.json").is_file()
    # what the dashboard shows of it, through the endpoints its Jobs and Actors pages read
    shown = local_head.run([sys.executable, str(LOCAL / "check_dashboard.py"), "--job", sid,
                            "--address", local_head.url], timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "dpaf_trial[dpaf_trial_" in shown.stdout and "printed twice" in shown.stdout, shown.stdout


# ---------------------------------------------------------------- secure defaults, true docs (issue #38)


def _fake_dashboard(train_status: int):
    """A stand-in dashboard on a free loopback port: one job with a progress line and a trial actor;
    the Train V2 runs endpoint answers `train_status`."""
    import http.server
    import threading

    sid = "tune-abc"
    log = "dpaf_trial_0a1b2c3d: iter 10/20 | ε executed 1.234\n"
    bodies = {
        "/api/jobs/": [{"submission_id": sid, "status": "SUCCEEDED", "start_time": 1, "entrypoint": "python tune.py"}],
        f"/api/jobs/{sid}/logs": {"logs": log},
        "/api/v0/actors": {"data": {"result": {"result": [{"repr_name": "dpaf_trial[dpaf_trial_0a1b2c3d]",
                                                          "state": "DEAD", "class_name": "ImplicitFunc"}]}}},
        "/api/v0/tasks": {"data": {"result": {"result": []}}},
        "/api/train/v2/runs/v1": {"train_runs": [{"name": "dpaf_trial_0a1b2c3d-train"}]},
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            status = train_status if path == "/api/train/v2/runs/v1" else (200 if path in bodies else 404)
            body = json.dumps(bodies.get(path, {})).encode() if status == 200 else b"Train state data is not available"
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


@pytest.mark.parametrize("train_status", [200, 500])
def test_check_dashboard_fails_when_an_endpoint_answers_an_http_error(train_status: int):
    server, url = _fake_dashboard(train_status)
    try:
        r = subprocess.run([sys.executable, str(LOCAL / "check_dashboard.py"), "--address", url],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "RAY_AUTH_TOKEN": "t"})
    finally:
        server.shutdown()
    if train_status == 200:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "dashboard check: ok" in r.stdout
    else:
        assert r.returncode == 1, r.stdout + r.stderr
        assert "500" in r.stdout and "dashboard check: ok" not in r.stdout


def test_the_docs_name_the_train_v2_runs_endpoint_ray_serves():
    """Ray 2.60's dashboard (dashboard/modules/train/train_head.py) serves Train V2 runs at
    /api/train/v2/runs/v1; /api/train/v2/runs is Train V1's and answers 500 for V2 runs."""
    operations = (REPO / "docs" / "operations.md").read_text()  # the dashboard is documented there
    assert "/api/train/v2/runs/v1" in operations
    import ray.dashboard.modules.train.train_head as train_head

    assert '@routes.get("/api/train/v2/runs/v1")' in Path(train_head.__file__).read_text()


def test_the_ray_auth_token_written_before_a_local_cluster_is_owner_only(tmp_path, monkeypatch):
    from dpaf_ray.auth_token import protect_auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    path = protect_auth_token(None)
    assert path == tmp_path / ".ray" / "auth_token"
    assert path.stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", path.read_text())  # Ray's own format (secrets.token_hex(32))
    path.chmod(0o644)  # as Ray 2.60 writes it with a 022 umask
    token = path.read_text()
    assert protect_auth_token(None) == path and path.stat().st_mode & 0o777 == 0o600 and path.read_text() == token
    # connecting to a cluster that is not ours: no token is created for it
    path.unlink()
    assert protect_auth_token("ray://10.0.0.1:10001") is None and not path.exists()
