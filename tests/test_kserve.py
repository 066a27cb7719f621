"""KServe integration: the manifests in deploy/kserve/ and the images in deploy/docker/.

The manifests are checked against the KServe SDK's model classes (deploy/kserve/validate.py, in a
subprocess) and against what KServe, Knative and inferd expect of each other; then inferd is
started with exactly the runtime's container args and env and serves a single-model storage
layout over gRPC and REST.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx_models
import pytest
import tritonclient.grpc as grpcclient
import yaml

from server import settings as server_settings
from tests.harness import ROOT, ServerProcess

KSERVE = ROOT / "deploy" / "kserve"
DOCKER = ROOT / "deploy" / "docker"
K8S_DEFAULT_GRACE = 30  # terminationGracePeriodSeconds when a pod spec sets none
CLOSE_MARGIN = 3  # seconds inferd needs after the drain: gRPC grace (1 s), HTTP/metrics close, exit


def _documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


DOCS = _documents()
RUNTIMES = {k: d for k, d in DOCS.items() if d["kind"] in ("ServingRuntime", "ClusterServingRuntime")}
SERVICES = {k: d for k, d in DOCS.items() if d["kind"] == "InferenceService"}


def _container(runtime: dict) -> dict:
    [container] = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    return container


def _flags(args: list[str], name: str = "add-sub") -> server_settings.Settings:
    """Parse a container's args (after `inferd`) with inferd's own parser, as KServe would run them."""
    assert args[0] == "inferd", "the image has no ENTRYPOINT: the first arg must be the command"
    argv = [a.replace("{{.Name}}", name) for a in args[1:]]
    try:
        return server_settings.from_args(argv)
    except SystemExit as exc:  # argparse reports and exits
        pytest.fail(f"inferd rejects the args {argv}: exit {exc.code}")


def _runtime_for(isvc: dict) -> dict:
    name = isvc["spec"]["predictor"]["model"]["runtime"]
    for kind in ("ServingRuntime", "ClusterServingRuntime"):  # KServe looks in the namespace first
        if f"{kind}/{name}" in RUNTIMES:
            return RUNTIMES[f"{kind}/{name}"]
    pytest.fail(f"{isvc['metadata']['name']} names runtime '{name}', which deploy/kserve/ does not define")


def _prestop_seconds(container: dict) -> int:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return int(command[1]) if command[:1] == ["sleep"] else 0


# ---------------------------------------------------------------- schema: the KServe SDK's classes


def test_manifests_validate_against_the_kserve_sdk(tmp_path):
    assert importlib.util.find_spec("kserve"), "the dev extra installs kserve==0.21.0 (pip install -e .[dev])"
    # a broken copy proves the validator can fail: a misspelled field, a wrong type, a field that
    # exists on a pod but not on a ServingRuntime
    broken = yaml.safe_load((KSERVE / "clusterservingruntime.yaml").read_text())
    broken["spec"]["supportedModelFormat"] = broken["spec"].pop("supportedModelFormats")
    broken["spec"]["terminationGracePeriodSeconds"] = 30
    broken["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    files = sorted(KSERVE.glob("*.yaml")) + [tmp_path / "broken.yaml"]
    run = subprocess.run([sys.executable, str(KSERVE / "validate.py"), "--json", *map(str, files)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    result = json.loads(run.stdout)
    problems = "\n".join(result.pop(str(tmp_path / "broken.yaml")))
    assert "has no field 'supportedModelFormat'" in problems
    assert "has no field 'terminationGracePeriodSeconds'" in problems
    assert "containerPort: expected an integer" in problems
    assert len(result) >= 6 and all(v == [] for v in result.values()), json.dumps(result, indent=1)


# ---------------------------------------------------------------- what KServe and inferd expect


@pytest.mark.parametrize("key", sorted(RUNTIMES))
def test_runtime_matches_inferd_and_kserve_conventions(key):
    runtime = RUNTIMES[key]
    spec, container = runtime["spec"], _container(runtime)
    assert {f["name"] for f in spec["supportedModelFormats"]} == {"onnx", "pytorch", "triton"}
    assert "v2" in spec["protocolVersions"]
    flags = _flags(container["args"])
    assert [str(p) for p in flags.model_repositories] == ["/mnt/models"]
    assert "--model-name={{.Name}}" in container["args"] and flags.http_port == 8080
    assert flags.strict_readiness  # a pod whose model failed to load must not be sent requests
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["ports"][0]["containerPort"] == flags.http_port  # KServe's Service port 80
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": flags.http_port}
    notes = spec["annotations"]
    assert notes["prometheus.kserve.io/port"] == notes["prometheus.io/port"] == str(flags.metrics_port)
    assert notes["prometheus.kserve.io/path"] == notes["prometheus.io/path"] == "/metrics"
    assert notes["prometheus.io/scrape"] == "true"
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False
    if runtime["metadata"]["name"].endswith("-knative"):
        # Knative routes one port per revision, owns preStop, and rejects probes on other ports
        assert list(ports) == ["http1"] and "lifecycle" not in container
        assert "startupProbe" not in container
    else:
        assert ports["h2c"] == flags.grpc_port and ports["metrics"] == flags.metrics_port
        assert spec["protocolVersions"] == ["v2", "grpc-v2"]
        # preStop + drain + close fit in the default grace period unless an InferenceService says more
        assert _prestop_seconds(container) + flags.exit_timeout_secs + CLOSE_MARGIN <= K8S_DEFAULT_GRACE


def test_cluster_and_namespaced_runtimes_are_the_same():
    assert RUNTIMES["ClusterServingRuntime/inferd"]["spec"] == RUNTIMES["ServingRuntime/inferd"]["spec"]


@pytest.mark.parametrize("key", sorted(SERVICES))
def test_inference_service_fits_its_runtime(key):
    isvc = SERVICES[key]
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    runtime = _runtime_for(isvc)
    spec, container = runtime["spec"], _container(runtime)
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert model["storageUri"]
    mode = isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    if "canaryTrafficPercent" in predictor:
        assert mode == "Knative", "canaryTrafficPercent only splits traffic in Knative mode"
        assert 0 <= predictor["canaryTrafficPercent"] <= 100
    if mode == "Knative":
        assert len(container["ports"]) <= 1 and "lifecycle" not in container
    else:
        assert mode == "Standard"
        # KServe appends the InferenceService's args to the runtime's; the last flag wins
        flags = _flags(container["args"] + model.get("args", []), isvc["metadata"]["name"])
        grace = predictor.get("terminationGracePeriodSeconds", K8S_DEFAULT_GRACE)
        assert _prestop_seconds(container) + flags.exit_timeout_secs + CLOSE_MARGIN <= grace


def test_examples_cover_rest_grpc_and_canary():
    protocols = {s["spec"]["predictor"]["model"]["protocolVersion"] for s in SERVICES.values()}
    assert {"v2", "grpc-v2"} <= protocols
    assert any("canaryTrafficPercent" in s["spec"]["predictor"] for s in SERVICES.values())


# ---------------------------------------------------------------- container images


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def _ignored(relative: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(relative).parts
    for p in patterns:
        if p.startswith("**/"):
            if any(Path(part).match(p[3:]) for part in parts):
                return True
        elif parts[: len(Path(p).parts)] == Path(p).parts:
            return True
    return False


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile(name, tmp_path):
    steps = _instructions(DOCKER / name)
    kinds = [k for k, _ in steps]
    assert "ENTRYPOINT" not in kinds  # the KServe runtime's args start with the command
    copied_to = set()
    for kind, args in steps:
        if kind != "COPY":
            continue
        words = shlex.split(args)
        sources, dest = [w for w in words[:-1] if not w.startswith("--")], words[-1]
        copied_to.add(dest.rstrip("/"))
        if not any(w.startswith("--from=") for w in words):
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: not in the repository"
                assert not _ignored(src), f"{name}: COPY {src}: excluded by .dockerignore"
    [cmd] = [json.loads(a) for k, a in steps if k == "CMD"]
    flags = _flags(cmd)
    assert str(flags.model_repositories[0]) in copied_to  # the example repository
    [user] = [a for k, a in steps if k == "USER"]
    assert user.split(":")[0] == str(_container(RUNTIMES["ClusterServingRuntime/inferd"])
                                     ["securityContext"]["runAsUser"])
    exposed = {int(p) for k, a in steps if k == "EXPOSE" for p in a.split()}
    assert exposed == {flags.http_port, flags.grpc_port, flags.metrics_port}
    [health] = [a for k, a in steps if k == "HEALTHCHECK"]
    assert "INFERD_HEALTH_URL" in health
    assert f"INFERD_HEALTH_URL=http://127.0.0.1:{flags.http_port}/v2/health/ready" in " ".join(
        a for k, a in steps if k == "ENV")
    # run the snippets that turn pyproject.toml into the image's requirement files
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    deps = " ".join(a for k, a in steps if k == "RUN" and "requirements" in a)
    snippets = re.findall(r'python -c "([^"]*)"\s*>\s*(\S+)', deps)
    for code, target in snippets:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                             check=True).stdout
        (tmp_path / target).write_text(out)
    requirements = (tmp_path / "requirements.txt").read_text().split()
    assert any(r.startswith("grpcio==") for r in requirements)
    assert (tmp_path / "requirements-torch.txt").read_text().startswith("torch")
    cpu_ort = [r for r in requirements if re.match(r"onnxruntime\b(?!-)", r)]
    if name.endswith(".cuda"):
        build_args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
        assert cpu_ort == [] and '"$ORT_GPU"' in deps
        assert build_args["ORT_GPU"].startswith("onnxruntime-gpu==")
        assert any(k == "RUN" and "pip install --no-deps ." in a for k, a in steps)
    else:
        assert cpu_ort and "onnxruntime-gpu" not in deps


# ---------------------------------------------------------------- inferd run as the runtime runs it


def _runtime_process(runtime: dict, storage: Path, name: str) -> ServerProcess:
    """inferd with the runtime's exact args and env: placeholders filled, /mnt/models mapped to
    ``storage``, and only the port numbers replaced by free ones."""
    container = _container(runtime)
    proc = ServerProcess([])
    ports = {"--http-port": proc.http_port, "--grpc-port": proc.grpc_port,
             "--metrics-port": proc.metrics_port}
    args = []
    for arg in container["args"]:
        arg = arg.replace("{{.Name}}", name).replace("/mnt/models", str(storage))
        flag = arg.split("=", 1)[0]
        args.append(f"{flag}={ports[flag]}" if flag in ports else arg)
    assert args[0] == "inferd"
    proc.args = [str(Path(sys.executable).parent / "inferd"), *args[1:]]  # the console script
    proc.env.update({e["name"]: e["value"].replace("{{.Name}}", name) for e in container.get("env", [])})
    return proc


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            text = reply.read()
            return reply.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_runtime_args_serve_a_single_model_over_grpc_and_http(tmp_path):
    storage = tmp_path / "mnt-models"  # what the storage initializer leaves for storageUri=.../model.onnx
    onnx_models.add_sub(storage / "model.onnx")
    name = "add-sub"
    runtime = RUNTIMES["ClusterServingRuntime/inferd"]
    exit_timeout = _flags(_container(runtime)["args"]).exit_timeout_secs
    proc = _runtime_process(runtime, storage, name)
    proc.start(tmp_path / "inferd.log")
    try:
        a = np.arange(32, dtype=np.int32).reshape(2, 16)
        b = np.full((2, 16), 3, dtype=np.int32)
        with grpcclient.InferenceServerClient(proc.grpc_url) as client:
            assert client.is_server_ready() and client.is_model_ready(name)
            metadata = client.get_model_metadata(name, as_json=True)
            assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
                ("INPUT0", "INT32", ["-1", "16"]), ("INPUT1", "INT32", ["-1", "16"])]
            inputs = [grpcclient.InferInput("INPUT0", [2, 16], "INT32"),
                      grpcclient.InferInput("INPUT1", [2, 16], "INT32")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = client.infer(name, inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        base = f"http://{proc.http_url}"
        assert _http("GET", f"{base}/v2/health/ready")[0] == 200  # the readiness probe's URL
        assert _http("GET", f"{base}/v2/health/live")[0] == 200  # the liveness probe's URL
        status, body = _http("POST", f"{base}/v2/models/{name}/infer", {"inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [2, 16], "data": a.ravel().tolist()},
            {"name": "INPUT1", "datatype": "INT32", "shape": [2, 16], "data": b.ravel().tolist()}]})
        assert status == 200, body
        outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in body["outputs"]}
        np.testing.assert_array_equal(outputs["OUTPUT0"], a + b)
        np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)
        # the scrape target the runtime's annotations name
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10) as reply:
            assert reply.status == 200 and b"# TYPE" in reply.read()
    finally:
        started = time.monotonic()
        code = proc.stop()
    assert code == 0, proc.log()
    assert time.monotonic() - started < exit_timeout  # idle: the drain has nothing to wait for


def test_storage_that_is_neither_repository_nor_model_is_refused(start_server, tmp_path):
    storage = tmp_path / "mnt-models"
    storage.mkdir()
    (storage / "notes.txt").write_text("not a model")
    proc = start_server([storage], "--model-name=x", wait_ready=False)
    assert proc.proc.wait(timeout=60) != 0
    assert "neither a model repository" in proc.log() and "notes.txt" in proc.log()

