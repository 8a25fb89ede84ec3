"""infra/k8s: the RayCluster and RayJob (KubeRay CRDs: a structural test of the fields we use,
their pod templates validated as core PodTemplates), the Prefect work-pool job template (its
placeholders all defined, the Job it renders valid), all consistent with terraform/."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from typing import Any

import pytest
import yaml

from tests.infra.tools import K8S, ROOT, TERRAFORM, binary, module, named, parse_module
from tests.infra.tools import pyproject_pin as pin

YAMLLINT_CONFIG = "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}"
IMAGE = "registry.example/amalgam@sha256:" + "0" * 64


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text())


def terraform_defaults() -> dict[str, Any]:
    return {k: v.get("default") for k, v in named(parse_module(TERRAFORM), "variable").items()}


def k8s_version() -> str:
    return terraform_defaults()["kubernetes_version"] + ".0"


def substituted(obj: Any) -> Any:
    """The manifest as `envsubst` leaves it: every ${VAR} filled in."""
    text = re.sub(
        r"\$\{(\w+)\}", lambda m: IMAGE if "IMAGE" in m.group(1) else "x", json.dumps(obj)
    )
    return json.loads(text)


def assert_valid(resource: dict[str, Any]) -> None:
    """kubernetes-validate, strict (unknown fields are errors), at the cluster's version."""
    kv = module("kubernetes_validate")
    try:
        kv.validate(resource, k8s_version(), strict=True)
    except kv.ValidationError as e:
        path = "/".join(str(p) for p in e.path)
        pytest.fail(f"{resource['kind']} {resource['metadata']['name']}: {path}: {e.message}")


def as_pod_template(name: str, template: dict[str, Any]) -> dict[str, Any]:
    """A pod template of a CRD wrapped as the core kind PodTemplate, placeholders filled."""
    meta = {"name": name}
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": meta,
        "template": substituted(template),
    }


def test_yaml_lints_clean() -> None:
    files = sorted(K8S.glob("*.yaml"))
    assert {f.name for f in files} >= {"raycluster.yaml", "rayjob.yaml"}
    yamllint = binary("yamllint")
    run = subprocess.run(
        [str(yamllint), "-f", "parsable", "-d", YAMLLINT_CONFIG, *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def groups(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def test_raycluster_structure() -> None:
    cluster = load("raycluster.yaml")
    tf = terraform_defaults()
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["metadata"]["name"] == tf["ray_cluster_name"]
    assert cluster["metadata"]["namespace"] == tf["ray_namespace"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == pin("ray")  # the image's Ray is pyproject's
    assert spec["enableInTreeAutoscaling"] is True
    by_name = groups(cluster)
    assert set(by_name) == {"head", "cpu", "gpu"}
    for name, group in by_name.items():
        params = group["rayStartParams"]
        assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), name
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == tf["ray_service_account"], name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        (container,) = pod["containers"]
        assert container["image"] in ("${AMALGAM_IMAGE}", "${AMALGAM_GPU_IMAGE}"), name
        resources = container["resources"]
        assert resources["requests"] and resources["limits"], name
        if name != "head":
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            # Ray schedules by what it is told it has: requests equal limits
            assert resources["requests"] == resources["limits"], name
    assert by_name["head"]["rayStartParams"]["num-cpus"] == "0"
    head_ports = {
        p["name"]: p["containerPort"]
        for p in by_name["head"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert head_ports["client"] == 10001  # the port in terraform's ray_address output


def test_gpu_group_matches_the_gpu_node_group() -> None:
    """Tolerates exactly the taint terraform puts on GPU nodes, selects their label, asks for
    a GPU; the CPU group neither tolerates the taint nor asks for GPUs."""
    eks = (TERRAFORM / "modules/aws/eks/main.tf").read_text()
    taint = re.search(
        r'taints\s+= \[\{ key = "([^"]+)", value = "([^"]+)", effect = "(\w+)" \}\]', eks
    )
    assert taint, "no GPU taint in modules/aws/eks"
    key, value, effect = taint.groups()
    by_name = groups(load("raycluster.yaml"))
    gpu = by_name["gpu"]["template"]["spec"]
    assert {
        "key": key,
        "operator": "Equal",
        "value": value,
        "effect": effect.title().replace("_", ""),
    } in gpu["tolerations"]
    assert gpu["nodeSelector"] == {"amalgam.dev/node-kind": "gpu"}
    assert '"amalgam.dev/node-kind" = "gpu"' in eks
    limits = gpu["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert gpu["containers"][0]["image"] == "${AMALGAM_GPU_IMAGE}"
    cpu = by_name["cpu"]["template"]["spec"]
    assert "tolerations" not in cpu and cpu["nodeSelector"] == {"amalgam.dev/node-kind": "cpu"}
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]


def test_raycluster_pod_templates_are_valid_core_pods() -> None:
    for name, group in groups(load("raycluster.yaml")).items():
        assert_valid(as_pod_template(f"ray-{name}", group["template"]))


def test_rayjob_runs_amalgam_on_the_cluster() -> None:
    job = load("rayjob.yaml")
    cluster = load("raycluster.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["amalgam", "merge"] and "--executor" in entrypoint
    assert entrypoint[entrypoint.index("--executor") + 1] == "ray"
    pod = job["spec"]["submitterPodTemplate"]
    assert (
        pod["spec"]["serviceAccountName"]
        == cluster["spec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
    )
    assert_valid(as_pod_template("ray-job-submitter", pod))


def test_rayjob_entrypoint_is_a_real_command() -> None:
    """The options the entrypoint uses exist in the CLI that the image installs."""
    # lazy: the CLI imports torch; only this test needs it
    from typer.testing import CliRunner

    from amalgam.cli import app

    result = CliRunner().invoke(app, ["merge", "--help"])
    assert result.exit_code == 0, result.output
    assert "--executor" in result.output


def render_job(template: dict[str, Any]) -> dict[str, Any]:
    """The Job a Kubernetes worker submits for a flow run with the variables' defaults: the
    placeholders filled by Prefect's templating, then prefect-kubernetes' own job
    configuration (its checks of the manifest, the env list, the command, the name)."""
    # lazy: Prefect and its Kubernetes worker take seconds to import; only this helper needs them
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values

    worker = module("prefect_kubernetes.worker")
    properties = template["variables"]["properties"]
    defaults = {k: v["default"] for k, v in properties.items() if "default" in v}
    values = {**defaults, "env": {"FROM_THE_DEPLOYMENT": "1"}}
    config = worker.KubernetesWorkerJobConfiguration(
        **apply_values(template["job_configuration"], values)
    )
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="nightly-run"))
    return config.job_manifest


def test_prefect_work_pool_template() -> None:
    template = json.loads((K8S / "prefect-work-pool.json").read_text())
    assert set(template) == {"job_configuration", "variables"}
    properties = template["variables"]["properties"]
    for name, prop in properties.items():
        assert prop.get("type") and prop.get("description"), f"variable {name}"
    placeholders = set(
        re.findall(r"\{\{\s*([\w.]+)\s*\}\}", json.dumps(template["job_configuration"]))
    )
    assert placeholders <= set(properties), f"undefined: {placeholders - set(properties)}"
    tf = terraform_defaults()
    assert properties["namespace"]["default"] == tf["ray_namespace"]
    assert properties["service_account_name"]["default"] == tf["ray_service_account"]
    cluster = load("raycluster.yaml")["metadata"]["name"]
    assert properties["ray_address"]["default"].startswith(
        f"ray://{cluster}-head-svc.{tf['ray_namespace']}."
    )
    job = render_job(template)
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == tf["ray_namespace"]
    assert not re.search(r"\{\{", json.dumps(job)), "a placeholder was left unfilled"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    # the template's own variables and the deployment's env both reach the pod
    assert env["RAY_ADDRESS"] == properties["ray_address"]["default"]
    assert env["FROM_THE_DEPLOYMENT"] == "1" and "PREFECT__FLOW_RUN_ID" in env
    # prefect-kubernetes requires parallelism and completions in the pod spec (where Kubernetes
    # ignores them with a warning): the rest must be a valid Job to the letter
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    assert_valid(job)


def test_work_pool_name_is_the_one_deployments_use() -> None:
    deployments = yaml.safe_load((ROOT / "infra/prefect.yaml").read_text())["deployments"]
    pools = {d["work_pool"]["name"] for d in deployments}
    assert pools == {terraform_defaults()["prefect_work_pool"]}


def test_validation_catches_a_wrong_field() -> None:
    """The core-kind check is strict: a misspelt field in a pod template fails it."""
    group = groups(load("raycluster.yaml"))["cpu"]
    group["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(pytest.fail.Exception, match="resource"):
        assert_valid(as_pod_template("bad", group["template"]))
