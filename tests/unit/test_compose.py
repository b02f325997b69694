"""docker-compose.yml and the root Dockerfile agree with the code they deploy.

No Docker engine runs where these tests run, so this checks what can go stale without one:
setting names, build targets, the factory each image runs (against ratchet.services.SERVICES),
NATS users and passwords, CLI commands, and that the Dockerfile is well formed.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from ratchet.cli import build_parser
from ratchet.natsconf import ROLES
from ratchet.services import SERVICES, Service
from ratchet.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
DOCKERFILE = REPO / "Dockerfile"
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
# the other stages of the Dockerfile (the review console is an operator tool, not a service)
NOT_SERVICES = {"build", "base", "local-model", "console"}


def is_settings_field(variable: str) -> bool:
    """Whether ``RATCHET_A__B`` names a field of :class:`Settings` (``a``, then its ``b``)."""
    model: type[BaseModel] = Settings
    *outer, last = variable.removeprefix("RATCHET_").lower().split("__")
    for name in outer:
        field = model.model_fields.get(name)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return False
        model = field.annotation
    return last in model.model_fields


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(keyword, arguments) of every instruction, continuation lines joined, comments dropped."""
    lines = [
        line
        for line in dockerfile.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    text = "\n".join(lines).replace("\\\n", " ")
    return [
        (keyword.upper(), rest.strip())
        for keyword, _, rest in (line.strip().partition(" ") for line in text.splitlines())
    ]


def stages(dockerfile: Path) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Each named stage: (what it is built FROM, its instructions after FROM)."""
    found: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            image, _as, name = rest.split()
            assert _as.upper() == "AS" and name not in found, f"FROM {rest}: name each stage once"
            current = []
            found[name] = (image, current)
        else:
            current.append((keyword, rest))
    return found


STAGES = stages(DOCKERFILE)


def cmd(stage: str) -> list[str]:
    [argv] = [json.loads(rest) for keyword, rest in STAGES[stage][1] if keyword == "CMD"]
    assert isinstance(argv, list)
    return argv


def test_settings_field_lookup() -> None:
    assert is_settings_field("RATCHET_NATS_URL")
    assert is_settings_field("RATCHET_AGENT__SPEC")
    assert not is_settings_field("RATCHET_AGENT__NOPE")
    assert not is_settings_field("RATCHET_NATS_URL__X")
    assert not is_settings_field("RATCHET_NOPE")


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_compose_variables_are_settings_fields(name: str) -> None:
    unknown = [
        key
        for key in environment(COMPOSE["services"][name])
        if key.startswith("RATCHET_") and not is_settings_field(key)
    ]
    assert not unknown, f"{name}: not fields of ratchet.settings.Settings: {unknown}"


def test_dockerfile_is_well_formed() -> None:
    """What `docker build` would reject first: an unknown instruction, an unnamed or repeated
    stage, a stage or mount built from a stage that does not exist (yet), a missing file."""
    unknown = [k for k, _ in instructions(DOCKERFILE) if k not in INSTRUCTIONS]
    assert not unknown, f"unknown instructions {unknown}"
    seen: set[str] = set()
    for name, (image, steps) in STAGES.items():
        assert ":" in image or image in seen, f"stage {name} is FROM {image}: no such stage"
        for keyword, rest in steps:
            for source in re.findall(r"from=([\w-]+)", rest):
                assert source in seen, f"stage {name} mounts from {source}: no earlier stage"
            if keyword == "CMD":
                json.loads(rest)  # the exec form: a JSON list
            if keyword == "COPY" and not rest.startswith("--"):
                *sources, _target = rest.split()
                missing = [src for src in sources if not (REPO / src).exists()]
                assert not missing, f"stage {name} copies {missing}: not in the build context"
        seen.add(name)


def test_dockerfile_variables_are_settings_fields() -> None:
    variables = [
        item.partition("=")[0]
        for keyword, rest in instructions(DOCKERFILE)
        if keyword == "ENV"
        for item in shlex.split(rest)
    ]
    assert variables, "the base image sets RATCHET_HOME and the config paths"
    unknown = [v for v in variables if v.startswith("RATCHET_") and not is_settings_field(v)]
    assert not unknown, f"not fields of ratchet.settings.Settings: {unknown}"


def test_llama_cpp_is_built_for_any_cpu() -> None:
    """A native build can use instructions (AMX) a virtual machine reports but traps; see
    scripts/install.sh."""
    runs = " ".join(rest for keyword, rest in STAGES["build"][1] if keyword == "RUN")
    assert "-DGGML_NATIVE=OFF" in runs


def test_every_service_is_deployed() -> None:
    expected = {s.name for s in SERVICES} | {"nats-1", "mongo", "local-model", "init-streams"}
    assert expected <= set(COMPOSE["services"])


def test_every_target_is_a_declared_service() -> None:
    orphans = set(STAGES) - NOT_SERVICES - {s.name for s in SERVICES}
    assert not orphans, f"Dockerfile targets that are not in ratchet.services: {sorted(orphans)}"


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_builds_are_targets_of_the_root_dockerfile(name: str) -> None:
    build = COMPOSE["services"][name].get("build")
    if build is None:
        return
    assert isinstance(build, dict) and set(build) == {"context", "target"}, build
    assert (REPO / build["context"]).resolve() == REPO
    assert build["target"] in STAGES, f"{name}: no target {build['target']} in the Dockerfile"


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_each_service_image_runs_its_own_factory(service: Service) -> None:
    image, steps = STAGES[service.name]
    assert image == "base" and [k for k, _ in steps] == ["CMD"], (
        f"target {service.name}: the shared base and a CMD, nothing else"
    )
    assert cmd(service.name) == ["faststream", "run", "--factory", service.factory]
    compose = COMPOSE["services"][service.name]
    assert compose["build"]["target"] == service.name and "command" not in compose


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_optional_services_start_only_with_a_profile(service: Service) -> None:
    profiles = COMPOSE["services"][service.name].get("profiles")
    assert bool(profiles) == service.optional, f"{service.name}: profiles {profiles}"


def test_local_model_target_serves_the_port_services_use() -> None:
    argv = cmd("local-model")
    assert argv[:3] == ["python", "-m", "llama_cpp.server"]
    port = argv[argv.index("--port") + 1]
    assert (
        f"local-model:{port}"
        in environment(COMPOSE["services"]["executor"])["RATCHET_AGENT__BASE_URL"]
    )


@pytest.mark.parametrize(
    "name",
    sorted(n for n, s in COMPOSE["services"].items() if "RATCHET_NATS_USER" in environment(s)),
)
def test_nats_user_and_password_variable(name: str) -> None:
    """Each container logs in as its own role with the password `ratchet natsconf` wrote for it."""
    env = environment(COMPOSE["services"][name])
    user = env["RATCHET_NATS_USER"]
    roles = {service.name: service.role for service in SERVICES}
    assert user in {"admin", *ROLES}
    if name in roles:
        assert user == roles[name], f"{name} must connect as its own role"
    variable = "RATCHET_PW_" + user.upper().replace("-", "_")
    assert re.fullmatch(rf"\$\{{{variable}(:\?[^}}]*)?\}}", env["RATCHET_NATS_PASSWORD"])


def test_evaluator_scales_out() -> None:
    evaluator = COMPOSE["services"]["evaluator"]
    assert evaluator["deploy"]["replicas"] >= 2
    assert "container_name" not in evaluator and "ports" not in evaluator


NATS_NODES = sorted(name for name in COMPOSE["services"] if name.startswith("nats-"))


def test_nats_is_a_three_node_cluster_every_client_knows() -> None:
    assert NATS_NODES == ["nats-1", "nats-2", "nats-3"]
    urls = [f"nats://{node}:4222" for node in NATS_NODES]
    for name, service in COMPOSE["services"].items():
        env = environment(service)
        if "RATCHET_NATS_URL" in env:
            assert env["RATCHET_NATS_URL"].split(",") == urls, name


@pytest.mark.parametrize("node", NATS_NODES)
def test_every_node_mounts_the_config_ratchet_natsconf_writes(node: str) -> None:
    out = build_parser().parse_args(["natsconf"]).out
    service = COMPOSE["services"][node]
    mounts = [volume.split(":")[0] for volume in service["volumes"]]
    assert f"./{out}/nats-server.conf" in mounts
    assert environment(service)["SERVER_NAME"] == node  # the config names each node by it


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_ratchet_commands_exist(name: str) -> None:
    command = COMPOSE["services"][name].get("command")
    if isinstance(command, list) and command[0] == "ratchet":
        build_parser().parse_args(command[1:])  # exits on an unknown command or option
