"""Every manifest under infra/ is secure by default: Ray token auth on in every
Ray container (token from a Secret), nothing exposed beyond the cluster
network (no NodePort / LoadBalancer / Ingress / host network), no open
dashboard without auth, no secret written inline."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
OPEN_HOSTS = ("0.0.0.0", "::", "[::]", "")
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "ACCESS_KEY")


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def _token_problems(where: str, container: dict) -> list[str]:
    env = _env(container)
    out = []
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        out.append(f"{where}: RAY_AUTH_MODE is not 'token'")
    ref = (env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") or {}).get("secretKeyRef")
    if not ref or not ref.get("name") or not ref.get("key"):
        out.append(f"{where}: RAY_AUTH_TOKEN does not come from a Secret (secretKeyRef)")
    return out


def _cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = doc.get("spec") or {}
    name = f"{doc['kind']} {doc.get('metadata', {}).get('name')}"
    if doc["kind"] == "RayCluster":
        return [(name, spec)]
    key = "rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"
    return [(name, spec[key])] if key in spec else []


def _walk(node, path=""):
    """Yield (path, dict) for every mapping in a document."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def manifest_problems(doc: dict) -> list[str]:
    """Every way `doc` (one parsed YAML document) is open; [] when secure."""
    if not isinstance(doc, dict) or "kind" not in doc:
        return []
    problems: list[str] = []
    kind = doc["kind"]
    # anywhere: nothing bound to the node or exposed outside the cluster
    for path, d in _walk(doc):
        if d.get("hostNetwork"):
            problems.append(f"{kind}{path}: hostNetwork")
        for p in d.get("ports") or []:
            if isinstance(p, dict) and ("hostPort" in p or "nodePort" in p):
                problems.append(f"{kind}{path}: hostPort/nodePort {p}")
        if d.get("type") in ("NodePort", "LoadBalancer") or \
                d.get("serviceType") in ("NodePort", "LoadBalancer"):
            problems.append(f"{kind}{path}: Service type {d.get('type') or d.get('serviceType')}")
        if d.get("enableIngress"):
            problems.append(f"{kind}{path}: enableIngress")
        for e in d.get("env") or []:
            if isinstance(e, dict) and "value" in e and \
                    any(w in e.get("name", "").upper() for w in SECRET_WORDS):
                problems.append(f"{kind}{path}: {e['name']} written inline (use a Secret)")
    if kind == "Ingress":
        problems.append(f"Ingress {doc.get('metadata', {}).get('name')}: exposes the cluster")
    if kind not in RAY_KINDS:
        return problems
    for name, spec in _cluster_specs(doc):
        auth = spec.get("authOptions") or {}
        if auth.get("mode") != "token":
            problems.append(f"{name}: authOptions.mode is not 'token'")
        head = spec.get("headGroupSpec") or {}
        groups = [("head", head)] + [(f"worker group {g.get('groupName')}", g)
                                     for g in spec.get("workerGroupSpecs") or []]
        for label, group in groups:
            containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
            if not containers:
                problems.append(f"{name} {label}: no containers")
            # the Ray container is the first one (KubeRay's RayContainerIndex);
            # sidecars may run too, and must not carry Ray's port without auth
            for c in containers[:1]:
                problems += _token_problems(f"{name} {label} container {c.get('name')}", c)
        host = str((head.get("rayStartParams") or {}).get("dashboard-host", "0.0.0.0"))
        head_containers = ((head.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        if host in OPEN_HOSTS and _token_problems("", head_containers[0]):
            problems.append(f"{name}: dashboard-host {host or 'default'} without token auth")
    if kind == "RayJob":
        sub = doc["spec"].get("submitterPodTemplate")
        if sub is None:
            problems.append("RayJob: no submitterPodTemplate carrying the token")
        else:
            for c in sub["spec"]["containers"]:
                problems += _token_problems(f"RayJob submitter {c.get('name')}", c)
    if kind == "RayService":
        serve = yaml.safe_load(doc["spec"].get("serveConfigV2") or "{}") or {}
        host = str((serve.get("http_options") or {}).get("host", "127.0.0.1"))
        if host in OPEN_HOSTS:
            head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
            c = head["template"]["spec"]["containers"][0]
            from_secret = any("secretRef" in s for s in c.get("envFrom") or []) or \
                "secretKeyRef" in str(_env(c).get("DHEADS_API_TOKEN", {}))
            if not from_secret:
                problems.append("RayService: Serve on 0.0.0.0 without DHEADS_API_TOKEN from a Secret")
    return problems


def _manifests() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_infra_has_the_three_ray_manifests():
    kinds = {d.get("kind") for p in _manifests() for d in yaml.safe_load_all(p.read_text()) if d}
    assert set(RAY_KINDS) <= kinds


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(INFRA)))
def test_manifest_is_secure_by_default(path):
    problems = [f"{path.name}: {m}" for d in yaml.safe_load_all(path.read_text())
                for m in manifest_problems(d)]
    assert not problems, "\n".join(problems)


def test_one_ray_token_secret_everywhere():
    """Operator, head, workers and submitter share one Secret (else 401s)."""
    names = set()
    for p in _manifests():
        for d in yaml.safe_load_all(p.read_text()):
            if not d or d.get("kind") not in RAY_KINDS:
                continue
            for _, spec in _cluster_specs(d):
                names.add(spec["authOptions"].get("secretName"))
            for _, m in _walk(d):
                ref = (m.get("valueFrom") or {}).get("secretKeyRef") if m.get("name") == "RAY_AUTH_TOKEN" else None
                if ref:
                    names.add(ref["name"])
                    assert ref["key"] == "auth_token"   # KubeRay's key in its auth Secret
    assert names == {"dheads-ray-auth"}


# The checker itself: the manifests as they were before issue 12 must fail it.
_OPEN = """
apiVersion: ray.io/v1
kind: RayCluster
metadata: {name: open}
spec:
  headGroupSpec:
    serviceType: NodePort
    rayStartParams: {dashboard-host: "0.0.0.0"}
    template:
      spec:
        containers:
          - name: ray-head
            image: x
            env: [{name: RAY_AUTH_TOKEN, value: hunter2}]
  workerGroupSpecs:
    - groupName: w
      rayStartParams: {}
      template: {spec: {containers: [{name: ray-worker, image: x}]}}
"""


def test_checker_flags_an_open_cluster():
    text = "\n".join(manifest_problems(yaml.safe_load(_OPEN)))
    for expected in ("authOptions.mode", "RAY_AUTH_MODE", "does not come from a Secret",
                     "dashboard-host 0.0.0.0 without token auth", "NodePort", "written inline",
                     "worker group w"):
        assert expected in text, text


def test_rayservice_overrides_make_a_service_that_starts(monkeypatch):
    """The RayService's `args.overrides` compose into a ServeJob whose state
    checks pass (`serve/app.py::_state`, what `build_app` runs first), with
    every DHEADS_* variable its containers take from Secrets set: an `s3://`
    job store, say, would be refused at start."""
    from dheads.platform.config import compose
    from dheads.serve import app

    for path in _manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "RayService":
                continue
            serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
            head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
            for name, e in _env(head).items():
                if name.startswith("DHEADS_") and "secretKeyRef" in str(e.get("valueFrom")):
                    monkeypatch.setenv(name, "postgresql://u:p@db.invalid/dheads"
                                       if name == app.JOB_STORE_ENV else "x" * 40)
            for application in serve_cfg["applications"]:
                assert application["import_path"] == "dheads.serve.app:app_builder"
                cfg = compose("serve", list(application["args"]["overrides"]))
                job_store, upload_dir = app._state(cfg.serve)
                if cfg.serve.upload_port is None:   # no listener: Serve's port must not buffer uploads
                    from dheads.serve.ingress import multipart_refusal

                    assert multipart_refusal(cfg.serve, None, "h")[0] == 415, path.name
                assert job_store.startswith("postgresql://") and upload_dir.startswith("s3://"), (
                    path.name, job_store, upload_dir)
