"""The task prompts an app serves, held in memory and composed ahead of time.

Each version is composed with the pinned rules (:func:`ratchet.rules.compose_system_prompt`)
and hashed once, when it arrives; reading one is a dictionary lookup. While a change is in
canary the arm of a rollout key is decided by :func:`ratchet.prompts.in_canary`, exactly as the
executor's :func:`ratchet.prompts.serve` decides it (a SHA-256 of the change and the key), and
remembered for the ``CANARY_KEYS`` keys used last, so a returning user costs a cache lookup,
not a hash. The cache outlives the connection: while NATS is unreachable the app keeps serving
the last version it saw, and with a cache file a restarted app starts from the versions it saw
last.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from pydantic import ValidationError

from ratchet.prompts import DEFAULT_PROMPT, PromptVersion, in_canary, sha256_text
from ratchet.rules import Rules, compose_system_prompt

log = logging.getLogger("ratchet.sdk")

CACHE_FORMAT = 1
CANARY_KEYS = 16_384  # (change, key, share) arms remembered, least recently used dropped first

canary_arm = lru_cache(maxsize=CANARY_KEYS)(in_canary)
""":func:`ratchet.prompts.in_canary` with the arms of the latest keys remembered: a pure
function of its arguments, so remembering it changes no answer."""
_draws = random.Random(os.urandom(16))  # the SDK's own, whatever the app seeds ``random`` with


class Prompt(NamedTuple):
    """What one run is served: give ``system`` to the model as its system message and report
    the run with this prompt (``report(prompt=...)``), so its score counts for ``version``."""

    text: str
    """The task prompt."""
    system: str
    """The system prompt: the pinned rules, then the task prompt, composed as the executor does."""
    version: int
    """The prompt-store version (0: the default prompt, the task has none stored)."""
    sha256: str
    """SHA-256 of ``text``."""
    rules_sha256: str
    """SHA-256 of the rules file ``system`` was composed with."""


@dataclass(frozen=True)
class _Task:
    stored: PromptVersion
    current: Prompt  # the stored version
    stable: Prompt | None  # while the stored version is in canary: the version the rest get
    change_id: str  # the change in canary, and the share of keys it gets
    share: float


class PromptCache:
    """The newest stored version of every task, ready to serve."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.default = self._compose(DEFAULT_PROMPT, 0)
        self._tasks: dict[str, _Task] = {}

    def _compose(self, text: str, version: int) -> Prompt:
        system = compose_system_prompt(self.rules, text)
        return Prompt(text, system, version, sha256_text(text), self.rules.sha256)

    def update(self, stored: PromptVersion) -> None:
        """A version arrived (from the prompt store or the cache file): serve it from now on."""
        canary = stored.record.canary
        stable = (
            None if canary is None else self._compose(canary.stable_text, canary.stable_version)
        )
        current = self._compose(stored.record.text, stored.version)
        share = 1.0 if canary is None else canary.share
        change_id = stored.record.change_id or ""
        self._tasks[stored.task] = _Task(stored, current, stable, change_id, share)

    def remove(self, task: str) -> None:
        """The task's prompt was deleted: it gets the default prompt, as in the executor."""
        self._tasks.pop(task, None)

    def prompt(self, task: str, key: str | None = None) -> Prompt:
        """The prompt a live run of ``task`` gets. ``key`` (a user, a conversation) keeps one
        key on one version while a change is in canary; without one, each call is a fresh
        draw, as a run without a rollout key is in the executor (its run id decides)."""
        entry = self._tasks.get(task)
        if entry is None:
            return self.default
        if entry.stable is None:
            return entry.current
        if key:
            canary = canary_arm(entry.change_id, key, entry.share)
        else:  # a fresh draw, with the canary's chance of a random key's hash; not remembered
            canary = _draws.random() < entry.share
        return entry.current if canary else entry.stable

    def in_canary(self, task: str) -> bool:
        """Whether a change to ``task`` serves only a share of its runs now."""
        entry = self._tasks.get(task)
        return entry is not None and entry.stable is not None

    def stored_version(self, task: str) -> int:
        """The newest version of ``task`` seen (0: none)."""
        entry = self._tasks.get(task)
        return 0 if entry is None else entry.stored.version

    def versions(self) -> list[PromptVersion]:
        return [entry.stored for entry in self._tasks.values()]

    def save(self, path: Path) -> None:
        """Write every version to ``path`` (atomically: a crash leaves the old file whole)."""
        data = {
            "format": CACHE_FORMAT,
            "prompts": [stored.model_dump(mode="json") for stored in self.versions()],
        }
        scratch = path.with_name(f".{path.name}.tmp")
        scratch.write_text(json.dumps(data))
        os.replace(scratch, path)

    def load(self, path: Path) -> int:
        """Serve the versions a cache file holds; how many. A missing file holds none; a file
        that is no cache is refused in one line; an entry that does not parse is skipped."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise ValueError(f"prompt cache {path} is not readable: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"prompt cache {path} is not a Ratchet prompt cache (format 1)")
        loaded = 0
        for item in data.get("prompts", []):
            try:
                self.update(PromptVersion.model_validate(item))
            except ValidationError as exc:
                log.warning(
                    "prompt cache %s: skipped an entry (%d errors)", path, exc.error_count()
                )
                continue
            loaded += 1
        return loaded
