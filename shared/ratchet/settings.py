"""Configuration, read from ``RATCHET_*`` environment variables (or a ``.env`` file)."""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ratchet.contracts import APP_NAME, APPROVER_NAME, CASES, LOOKS, TASK_NAME_PATTERN

REPO_ROOT = Path(__file__).resolve().parents[2]


def config_dir(repo_root: Path = REPO_ROOT, prefix: Path = Path(sys.prefix)) -> Path:
    """Where the pinned rules and the suites are by default: ``config/`` of a source checkout, or
    the copy an installed package puts under ``<prefix>/share/ratchet/config`` (pyproject's
    data-files). ``RATCHET_RULES_PATH`` and ``RATCHET_SUITES_DIR`` override both."""
    checkout = repo_root / "config"
    installed = prefix / "share" / "ratchet" / "config"
    for candidate in (checkout, installed):
        if (candidate / "behavior_rules.json").is_file():
            return candidate
    return checkout  # neither: the error that follows names the checkout's path


class ModelSettings(BaseSettings):
    """One model: ``spec`` picks the provider, see :func:`ratchet.models.make_chat_model`."""

    model_config = SettingsConfigDict(extra="ignore")

    spec: str = "local"
    base_url: str | None = None
    api_key: str | None = None
    temperature: float = 0.0
    max_tokens: int = 256
    timeout_s: float = 120.0


class GateSettings(BaseSettings):
    """How the gatekeeper measures a change (see :mod:`ratchet.sequential`)."""

    model_config = SettingsConfigDict(extra="ignore")

    max_cases: int = Field(default=200, ge=1, le=CASES, description="Cases at the last look.")
    looks: int = Field(default=8, ge=1, le=LOOKS, description="Planned looks, evenly spaced.")
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="One-sided, over all looks.")
    verify_reserve: int = Field(
        default=20, ge=0, description="Pool cases no decision may use: fresh cases for verify."
    )
    verify_cases: int = Field(
        default=100,
        ge=0,
        description="Fresh cases the check after applying runs. 0: no such check, only with a "
        "canary (canary_share above 0), which checks the change on live traffic instead.",
    )
    holdout_cases: int = Field(default=200, ge=1, description="Holdout cases run after a keep.")
    pool_budget: int = Field(
        default=50,
        ge=1,
        description="Changes measured on one gate pool before auto-approval stops: past it, "
        "repeated proposals may have overfit the pool; rotate it.",
    )
    rollback_margin: float = Field(
        default=0.05, ge=0, le=0.2, description="Non-inferiority margin of a proposed rollback."
    )
    run_timeout_s: float = Field(default=600.0, gt=0, description="Wait for one look's runs.")
    canary_share: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Share of live traffic an applied change serves first, until live scores "
        "show it not worse (promoted) or worse (rolled back). 0: no canary, an applied change "
        "serves everyone at once (a stack without live traffic could never finish a canary).",
    )
    canary_margin: float = Field(
        default=0.05, ge=0.0, le=0.5, description="Promoted once shown no worse than this."
    )
    canary_alpha: float = Field(
        default=0.05, gt=0.0, lt=0.5, description="Error rate of the canary's test, anytime."
    )
    canary_max_runs: int = Field(
        default=20_000,
        ge=1,
        description="Canary-arm runs after which a canary not yet shown no worse is rolled back.",
    )

    @model_validator(mode="after")
    def _something_checks_an_applied_change(self) -> GateSettings:
        if self.verify_cases == 0 and self.canary_share == 0:
            raise ValueError(
                "verify_cases 0 skips the check after applying; it needs a canary (canary_share "
                "above 0) to check the change on live traffic instead"
            )
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RATCHET_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = None
    nats_password: str | None = None

    home: Path = Field(default=Path(".ratchet"), description="Where state lives: db, nats data.")
    store_url: str = Field(
        default="",
        description='Runs, failures and the audit trail: "" = SQLite in home (one host); '
        '"sqlite:///path.db"; "postgresql://…" = PostgreSQL, shared by the services of several '
        'hosts; "mongodb://…".',
    )
    checkpoint_url: str = Field(
        default="",
        pattern=r"^$|^postgres(ql)?://",
        description='The gatekeeper\'s change threads and run ledger: "" = SQLite files in its '
        'home (one gatekeeper); "postgresql://…" = PostgreSQL, shared by several gatekeepers, '
        "each change worked by one at a time under a lease in NATS KV.",
    )
    rules_path: Path = Field(default_factory=lambda: config_dir() / "behavior_rules.json")
    suites_dir: Path = Field(default_factory=lambda: config_dir() / "suites")

    agent: ModelSettings = Field(default_factory=ModelSettings)
    judge: ModelSettings = Field(default_factory=ModelSettings)
    proposer: ModelSettings = Field(default_factory=ModelSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    local_model_port: int = 8088

    agent_factory: str | None = Field(
        default=None, description='Your own agent: "package.module:function", see docs.'
    )
    agent_tools: list[str] = Field(default_factory=lambda: ["calculator", "word_count"])

    failure_threshold: float = 0.7
    max_deliver: int = 5
    ack_wait_s: float = Field(
        default=30.0,
        description="Redelivery delay for a message whose handler went silent; handlers that "
        "work longer send in_progress() heartbeats every ack_wait_s / 3.",
    )
    workers: int = Field(default=8, description="Messages a service handles concurrently.")
    judge_attempts: int = 3
    min_failures_to_propose: int = 20
    agent_max_steps: int = 6
    approver_rule: str = "superior"  # the policy approver's: superior | min-lift:X
    approvers: list[Annotated[str, StringConstraints(pattern=APPROVER_NAME)]] = Field(
        default_factory=lambda: ["operator"],
        description="Who may decide besides the policy approver (always named policy): one NATS "
        "user each (approver-<name>), allowed to publish only its own decisions.",
    )

    apps: list[Annotated[str, StringConstraints(pattern=APP_NAME)]] = Field(
        default_factory=lambda: ["app"],
        description="Instrumented apps that report their runs (the SDK): one NATS user each "
        "(app-<name>), allowed to read prompts and publish its own runs, nothing else.",
    )
    app_tasks: dict[
        Annotated[str, StringConstraints(pattern=APP_NAME)],
        list[Annotated[str, StringConstraints(pattern=TASK_NAME_PATTERN)]],
    ] = Field(
        default_factory=dict,
        description='The tasks each app may report, e.g. {"shop": ["answer-only"]}; the '
        "evaluator and the failure store dead-letter a report of any other task, so an app "
        "cannot sway another task's failures or canary. An app not named may report every task "
        "(one machine, your own apps); name every app in a shared deployment.",
    )
    judge_sample_rate: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of live runs without a check that the judge scores (chosen by run "
        "id); the others stay unscored. Gate runs are always scored.",
    )

    @property
    def nats_servers(self) -> list[str]:
        """Every server of ``nats_url``, which may list a cluster's nodes separated by commas:
        each connection is given all of them, so it rides out the loss of any one."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]

    def app_may_report(self, app: str, task: str) -> bool:
        """Whether the app ``app`` may report runs of ``task`` (:attr:`app_tasks`)."""
        tasks = self.app_tasks.get(app)
        return tasks is None or task in tasks

    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.home / 'ratchet.db'}"


def to_env(settings: Settings) -> dict[str, str]:
    """The environment that recreates ``settings`` in a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json", exclude_none=True).items():
        nested = Settings.model_fields[name].annotation
        if isinstance(value, dict) and not (
            isinstance(nested, type) and issubclass(nested, BaseModel)
        ):
            env[f"RATCHET_{name.upper()}"] = json.dumps(value)  # a mapping setting, as JSON
        elif isinstance(value, dict):
            for key, inner in value.items():
                if inner is not None:
                    env[f"RATCHET_{name.upper()}__{key.upper()}"] = str(inner)
        elif isinstance(value, list):
            env[f"RATCHET_{name.upper()}"] = json.dumps(value)
        else:
            env[f"RATCHET_{name.upper()}"] = str(value)
    return env


@lru_cache
def get_settings() -> Settings:
    return Settings()
