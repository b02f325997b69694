"""The services Ratchet deploys, declared once.

``ratchet up`` starts them, ``docker-compose.yml`` and the root ``Dockerfile`` have one service and
one build target per entry, ``scripts/gen-asyncapi`` writes one document per entry, and the tests
check all of these against this list. Each service is a FastStream app built by a factory,
``build_app(settings: Settings | None = None) -> FastStream``, run with
``faststream run --factory MODULE:build_app``.
"""

from __future__ import annotations

from typing import NamedTuple


class Service(NamedTuple):
    name: str  # process and log name, compose service, Dockerfile target, AsyncAPI document
    role: str  # the NATS user it connects as (ratchet.natsconf.ROLES)
    factory: str  # "module:build_app"
    optional: bool = False  # not started by `ratchet up`; a compose profile

    @property
    def command(self) -> list[str]:
        """The command that runs this service (in a container, or under ``ratchet up``)."""
        return ["faststream", "run", "--factory", self.factory]


SERVICES: tuple[Service, ...] = (
    Service("executor", "executor", "ratchet_executor.app:build_app"),
    Service("evaluator", "evaluator", "ratchet_evaluator.app:build_app"),
    Service("failure-store", "failure-store", "ratchet_failure_store.app:build_app"),
    Service("proposer", "proposer", "ratchet_proposer.app:build_app"),
    Service("gatekeeper", "gatekeeper", "ratchet_gatekeeper.app:build_app"),
    # the policy approver: people decide unless someone chooses a policy (`ratchet approver`);
    # it decides as the approver named policy
    Service("approver", "approver-policy", "ratchet_approver.app:build_app", optional=True),
)

# What `ratchet up` starts.
CORE_SERVICES: tuple[Service, ...] = tuple(s for s in SERVICES if not s.optional)


def get_service(name: str) -> Service:
    for service in SERVICES:
        if service.name == name:
            return service
    raise KeyError(f"no service {name!r}; known: {', '.join(s.name for s in SERVICES)}")
