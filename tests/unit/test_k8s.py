"""The Kubernetes manifests (deploy/k8s) agree with the code they deploy and with Kubernetes.

No cluster runs where these tests run, so this checks what can be checked without one: every
object against the Kubernetes API schema of a recent release (strict: an unknown field fails),
every service of ratchet.services.SERVICES deployed once with the image of its Dockerfile target
and its own NATS user, every password from the secret `ratchet natsconf` fills, every setting a
real setting, the NATS cluster's routes, evaluators that can scale, two gatekeepers on PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from test_compose import is_settings_field, stages

from ratchet.audit import SIGNING_KEY_FILE
from ratchet.cli import build_parser
from ratchet.natsconf import users
from ratchet.services import SERVICES, Service
from ratchet.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE_UID = 10001  # the user the images run as (the Dockerfile's useradd)
KUBERNETES = "1.30"  # the oldest release still in upstream support when written
KUSTOMIZATION: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
OBJECTS: list[dict[str, Any]] = [
    document
    for name in KUSTOMIZATION["resources"]
    for document in yaml.safe_load_all((K8S / name).read_text())
    if document
]


def named(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in OBJECTS if o["kind"] == kind}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return dict(containers[0])


def env(workload: dict[str, Any]) -> dict[str, Any]:
    """Its container's variables: plain values, and the secret keys the others come from."""
    found: dict[str, Any] = {}
    for item in container(workload).get("env", []):
        source = item.get("valueFrom", {}).get("secretKeyRef")
        found[item["name"]] = (source["name"], source["key"]) if source else item.get("value")
    return found


def settings_of(workload: dict[str, Any]) -> dict[str, Any]:
    """Every RATCHET_* variable its container gets, the shared config map's included."""
    found: dict[str, Any] = {}
    for source in container(workload).get("envFrom", []):
        found.update(named("ConfigMap")[source["configMapRef"]["name"]]["data"])
    found.update(env(workload))
    return {key: value for key, value in found.items() if key.startswith("RATCHET_")}


DEPLOYMENTS = named("Deployment")
WORKLOADS = [*DEPLOYMENTS.values(), *named("Job").values(), *named("StatefulSet").values()]


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_object_is_valid_kubernetes(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    broken = yaml.safe_load(yaml.safe_dump(DEPLOYMENTS["evaluator"]))
    broken["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_every_service_is_a_deployment_of_its_own_image_and_user(service: Service) -> None:
    deployment = DEPLOYMENTS[service.name]
    image = container(deployment)["image"]
    assert image == f"ratchet-{service.name}" and service.name in stages(REPO / "Dockerfile")
    assert {i["name"] for i in KUSTOMIZATION["images"]} >= {image}
    assert env(deployment)["RATCHET_NATS_USER"] == service.role
    assert (deployment["spec"]["replicas"] == 0) == service.optional


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w["metadata"]["name"])
def test_variables_are_settings_and_passwords_come_from_natsconf(workload: dict[str, Any]) -> None:
    settings = settings_of(workload)
    for name in settings:
        assert is_settings_field(name), f"{name} is no setting"
    if "RATCHET_NATS_USER" in settings:
        user = settings["RATCHET_NATS_USER"]
        known = {"admin", *users(Settings().approvers, Settings().apps)}
        assert user in known
        key = "RATCHET_PW_" + user.upper().replace("-", "_")  # what `ratchet natsconf` writes
        assert settings["RATCHET_NATS_PASSWORD"] == ("ratchet-passwords", key)


def test_clients_know_every_node_of_the_cluster() -> None:
    nats = named("StatefulSet")["nats"]
    nodes = nats["spec"]["replicas"]
    assert nodes == 3 and nats["spec"]["serviceName"] == "nats"
    urls = named("ConfigMap")["ratchet-settings"]["data"]["RATCHET_NATS_URL"].split(",")
    assert urls == [f"nats://nats-{i}.nats:4222" for i in range(nodes)]
    assert named("Service")["nats"]["spec"]["clusterIP"] == "None"  # the nodes' own names


def test_evaluators_scale_on_their_own() -> None:
    evaluator = DEPLOYMENTS["evaluator"]
    assert evaluator["spec"]["replicas"] >= 2
    assert "volumes" not in evaluator["spec"]["template"]["spec"]  # no state of its own


def test_two_gatekeepers_share_postgresql_and_one_audit_key() -> None:
    gatekeeper = DEPLOYMENTS["gatekeeper"]
    assert gatekeeper["spec"]["replicas"] == 2
    url = settings_of(gatekeeper)["RATCHET_CHECKPOINT_URL"]
    assert url.startswith("postgresql://") and "@postgres:5432/" in url
    # the key is copied from the secret into the home as the gatekeeper's own 0600 file (it
    # refuses a key others may read), by the user the image runs as
    pod = gatekeeper["spec"]["template"]["spec"]
    [copy] = pod["initContainers"]
    assert copy["command"] == [
        "install", "-m", "600", "/secret/gatekeeper-audit-key.pem", "/data/"
    ]  # fmt: skip
    assert pod["securityContext"]["runAsUser"] == DOCKERFILE_UID
    assert SIGNING_KEY_FILE == "gatekeeper-audit-key.pem"
    assert settings_of(gatekeeper)["RATCHET_HOME"] == "/data"


@pytest.mark.parametrize("name", ["proposer", "console", "gatekeeper"])
def test_pods_with_a_home_run_as_the_images_user(name: str) -> None:
    """Their volumes are writable by the user the Dockerfile's images run as."""
    context = DEPLOYMENTS[name]["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsUser"] == context["fsGroup"] == DOCKERFILE_UID
    assert f"--uid {DOCKERFILE_UID} " in (REPO / "Dockerfile").read_text()


def test_commands_exist() -> None:
    parser = build_parser()
    for workload in WORKLOADS:
        command = container(workload).get("command") or []
        if command[:1] == ["ratchet"]:
            parser.parse_known_args(command[1:])  # exits on an unknown command
