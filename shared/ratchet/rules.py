"""The pinned behavior rules: read-only to the loop, composed into every system prompt.

They live in ``config/behavior_rules.json``, reviewed like code, and never in the prompt store.
Every run records the hash of the rules it ran under.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


class RulesError(ValueError):
    """The rules file is missing or malformed."""


@dataclass(frozen=True)
class Rules:
    rules: tuple[str, ...]
    sha256: str

    def render(self) -> str:
        return "\n".join(f"- {rule}" for rule in self.rules)


def load_rules(path: Path) -> Rules:
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise RulesError(f"cannot read behavior rules from {path}: {exc}") from exc
    rules = data.get("rules") if isinstance(data, dict) else None
    if not isinstance(rules, list) or not rules or not all(isinstance(r, str) for r in rules):
        raise RulesError(f'{path} must hold {{"rules": ["...", ...]}} with at least one rule')
    return Rules(rules=tuple(rules), sha256=hashlib.sha256(raw).hexdigest())


def compose_system_prompt(rules: Rules, task_prompt: str) -> str:
    """Rules first, then the task prompt: the order the seed lesson uses."""
    return f"RULES (never break):\n{rules.render()}\n\nTASK:\n{task_prompt}"
