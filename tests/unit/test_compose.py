"""docker-compose.yml and the Dockerfiles agree with the code they deploy.

No Docker engine runs where these tests run, so this checks what can go stale without one:
setting names, paths, app modules, NATS users and passwords, and CLI commands.
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
from ratchet.settings import Settings
from ratchet.up import SERVICES

REPO = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICE_DOCKERFILES = {name: REPO / "services" / name / "Dockerfile" for name, _, _ in SERVICES}
DOCKERFILES = sorted({*SERVICE_DOCKERFILES.values(), *REPO.glob("docker/*/Dockerfile")})


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


def instructions(dockerfile: Path, keyword: str) -> list[str]:
    """The arguments of every ``keyword`` instruction, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return [line[len(keyword) :].strip() for line in text.splitlines() if line.startswith(keyword)]


def faststream_app(dockerfile: Path) -> str | None:
    [cmd] = instructions(dockerfile, "CMD ")
    argv = json.loads(cmd)
    return argv[2] if argv[:2] == ["faststream", "run"] else None


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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_variables_are_settings_fields(dockerfile: Path) -> None:
    variables = [
        item.partition("=")[0]
        for env in instructions(dockerfile, "ENV ")
        for item in shlex.split(env)
    ]
    unknown = [v for v in variables if v.startswith("RATCHET_") and not is_settings_field(v)]
    assert not unknown, f"not fields of ratchet.settings.Settings: {unknown}"


def test_every_service_is_deployed() -> None:
    expected = {name for name, _, _ in SERVICES} | {"nats", "mongo", "local-model", "init-streams"}
    assert expected <= set(COMPOSE["services"])


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_build_context_and_dockerfile_exist(name: str) -> None:
    build = COMPOSE["services"][name].get("build")
    if build is None:
        return
    context = REPO / (build if isinstance(build, str) else build.get("context", "."))
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert context.is_dir(), f"{name}: no build context {context}"
    assert (context / dockerfile).is_file(), f"{name}: no Dockerfile {context / dockerfile}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_apps_are_services(dockerfile: Path) -> None:
    app = faststream_app(dockerfile)
    assert app is None or app in {app for _, _, app in SERVICES}, f"unknown app {app}"


@pytest.mark.parametrize(("name", "app"), [(name, app) for name, _, app in SERVICES])
def test_each_service_image_runs_its_own_app(name: str, app: str) -> None:
    assert faststream_app(SERVICE_DOCKERFILES[name]) == app
    build = COMPOSE["services"][name]["build"]
    assert REPO / build["context"] / build["dockerfile"] == SERVICE_DOCKERFILES[name]


def test_service_dockerfiles_differ_only_in_cmd() -> None:
    """Same shape, so the layers before CMD are built once and shared by all services."""
    shapes = {
        name: [line for line in path.read_text().splitlines() if not line.startswith("CMD ")]
        for name, path in SERVICE_DOCKERFILES.items()
    }
    first, *rest = shapes.items()
    for name, shape in rest:
        assert shape == first[1], f"services/{name}/Dockerfile drifted from services/{first[0]}"


@pytest.mark.parametrize(
    "name",
    sorted(n for n, s in COMPOSE["services"].items() if "RATCHET_NATS_USER" in environment(s)),
)
def test_nats_user_and_password_variable(name: str) -> None:
    """Each container logs in as its own role with the password `ratchet natsconf` wrote for it."""
    env = environment(COMPOSE["services"][name])
    user = env["RATCHET_NATS_USER"]
    roles = {service: role for service, role, _ in SERVICES}
    assert user in {"admin", *ROLES}
    if name in roles:
        assert user == roles[name], f"{name} must connect as its own role"
    variable = "RATCHET_PW_" + user.upper().replace("-", "_")
    assert re.fullmatch(rf"\$\{{{variable}(:\?[^}}]*)?\}}", env["RATCHET_NATS_PASSWORD"])


def test_evaluator_scales_out() -> None:
    evaluator = COMPOSE["services"]["evaluator"]
    assert evaluator["deploy"]["replicas"] >= 2
    assert "container_name" not in evaluator and "ports" not in evaluator


def test_nats_mounts_the_config_ratchet_natsconf_writes() -> None:
    out = build_parser().parse_args(["natsconf"]).out
    mounts = [volume.split(":")[0] for volume in COMPOSE["services"]["nats"]["volumes"]]
    assert f"./{out}/nats-server.conf" in mounts


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_ratchet_commands_exist(name: str) -> None:
    command = COMPOSE["services"][name].get("command")
    if isinstance(command, list) and command[0] == "ratchet":
        build_parser().parse_args(command[1:])  # exits on an unknown command or option
