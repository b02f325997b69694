"""A FAKE world with a known ground truth, to test the gate against. Not a model of anything real.

Every (case, task prompt) pair has a latent pass probability derived from a seed, so the true
success rate of any prompt on the whole case population, and so the true effect of any change, is
known exactly. The ``scripted:world`` chat model (:mod:`ratchet.scripted`) answers by sampling from
it, and ``benchmarks/drift.py`` uses the same functions in process.

The model:

- case ``i`` has a difficulty ``a_i ~ N(0, 1)``, and is *deterministic* with probability
  ``deterministic_share``, otherwise *flaky*;
- a prompt has an integer id ``k`` and a true success rate ``s``; its level ``mu(s)`` is the one
  that gives the population success rate ``s`` (closed form below, inverted by bisection);
- each (case, prompt id) pair has an interaction ``h(i, k) ~ N(0, 1)``, independent across prompt
  ids, and ``z = mu + a_i + unevenness * h(i, k)``;
- a deterministic case passes iff ``z > 0`` (probability 0 or 1 under a given prompt); a flaky one
  passes with probability ``Phi(z)`` on every run.

Averaged over the case population (``a`` and ``h`` standard normal, independent), with share
``d`` and unevenness ``u``::

    success(mu) = d * Phi(mu / sqrt(1 + u^2)) + (1 - d) * Phi(mu / sqrt(2 + u^2))

Because ``h`` is drawn afresh for every prompt id, a change acts unevenly: even a +10 point change
breaks some cases that passed before, and a neutral change fixes some and breaks as many. The
larger ``unevenness``, the more cases a change of a given size reshuffles.

All randomness is counter-based (splitmix64 of (seed, stream, prompt id, case index)), vectorised
with numpy over arrays of case indices, so one case in a chat model and 200 cases in a simulation
go through the same code and agree exactly.

Prompts carry their identity as a tag, ``"Answer the question. [world prompt 17: success 0.5312]"``;
a prompt without a tag is the base prompt (id 0, success ``base_success``). Cases carry their
index in the input, ``"World case 17"``, and their right answer is ``"w17"``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from scipy.special import ndtr, ndtri

__all__ = [
    "BASE_PROMPT",
    "FakeProposer",
    "World",
    "WorldSettings",
    "case_answer",
    "case_index",
    "case_input",
    "format_prompt",
    "level_for",
    "parse_prompt",
    "pass_probability",
    "population_success",
    "strip_tag",
    "world_suite",
]

BASE_PROMPT = "Answer the question."
MIN_SUCCESS, MAX_SUCCESS = 0.02, 0.98  # where the fake proposer keeps a prompt's true success

_TAG = re.compile(r"\s*\[world prompt (\d+): success ([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\]")
_CASE = re.compile(r"World case (\d+)\b")

# Independent random streams of the hash.
_DIFFICULTY, _DETERMINISTIC, _INTERACTION = 1, 2, 3
_MASK64 = (1 << 64) - 1

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class WorldSettings(BaseSettings):
    """The world's knobs (environment ``RATCHET_WORLD__SEED`` etc.)."""

    model_config = SettingsConfigDict(env_prefix="RATCHET_WORLD__", extra="ignore")

    seed: int = Field(default=0, ge=0, description="Seed of every latent quantity.")
    base_success: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="True success rate of the untagged base prompt."
    )
    deterministic_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Share of cases that pass with probability 0 or 1 under a given prompt.",
    )
    unevenness: float = Field(
        default=0.25, ge=0.0, description="How unevenly a change acts across cases."
    )
    latency_s: float = Field(default=0.0, ge=0.0, description="Sleep per model call (seconds).")
    judge_latency_s: float = Field(
        default=0.0, ge=0.0, description="Sleep per call of the scripted judges (seconds)."
    )
    proposer_mean: float = Field(
        default=-0.01, description="Mean true effect of the fake proposer's candidates."
    )
    proposer_sd: float = Field(
        default=0.06, ge=0.0, description="Standard deviation of those effects."
    )


# --- counter-based randomness -------------------------------------------------------------------


def _splitmix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _u64(x: Any) -> npt.NDArray[np.uint64]:
    """Python ints or integer arrays as uint64 (negative values wrap; they are only hashed)."""
    array = np.asarray(x)
    if array.dtype == np.uint64:
        return array
    if array.dtype == object or array.dtype.kind not in "iu":
        array = np.asarray(np.vectorize(lambda v: int(v) & _MASK64, otypes=[np.uint64])(array))
        return array
    return array.astype(np.int64).astype(np.uint64)


def _uniform(seed: Any, stream: int, prompt_id: Any, case: Any) -> FloatArray:
    """Uniforms in (0, 1), one per broadcast element of (seed, prompt id, case)."""
    h = _splitmix(_u64(seed) ^ np.uint64(0x5EED))
    h = _splitmix(h ^ np.uint64(stream))
    h = _splitmix(h ^ _u64(prompt_id))
    h = _splitmix(h ^ _u64(case))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _normal(seed: Any, stream: int, prompt_id: Any, case: Any) -> FloatArray:
    return np.asarray(ndtri(_uniform(seed, stream, prompt_id, case)), dtype=np.float64)


# --- the closed form ----------------------------------------------------------------------------


def population_success(mu: Any, deterministic_share: float, unevenness: float) -> FloatArray:
    """True success rate over the whole case population of a prompt with level ``mu``."""
    mu = np.asarray(mu, dtype=np.float64)
    u2 = unevenness**2
    d = deterministic_share
    return np.asarray(
        d * ndtr(mu / np.sqrt(1.0 + u2)) + (1.0 - d) * ndtr(mu / np.sqrt(2.0 + u2)),
        dtype=np.float64,
    )


def level_for(success: Any, deterministic_share: float, unevenness: float) -> FloatArray:
    """The level ``mu`` whose population success rate is ``success`` (vectorised bisection)."""
    target = np.clip(np.asarray(success, dtype=np.float64), 1e-12, 1.0 - 1e-12)
    low = np.full_like(target, -60.0)
    high = np.full_like(target, 60.0)
    for _ in range(80):  # 120 / 2**80: far below float resolution
        mid = (low + high) / 2.0
        above = population_success(mid, deterministic_share, unevenness) > target
        high = np.where(above, mid, high)
        low = np.where(above, low, mid)
    return np.asarray((low + high) / 2.0, dtype=np.float64)


@functools.lru_cache(maxsize=4096)
def _level(success: float, deterministic_share: float, unevenness: float) -> float:
    return float(level_for(success, deterministic_share, unevenness))


def pass_probability(
    seed: Any,
    cases: Any,
    prompt_id: Any,
    mu: Any,
    deterministic_share: float,
    unevenness: float,
) -> FloatArray:
    """Latent pass probability of each case under a prompt; every argument broadcasts.

    ``seed``, ``cases`` and ``prompt_id`` are integers (or arrays of them), ``mu`` the prompt's
    level (see :func:`level_for`). This is the one implementation every user of the world calls.
    """
    difficulty = _normal(seed, _DIFFICULTY, 0, cases)
    deterministic = _uniform(seed, _DETERMINISTIC, 0, cases) < deterministic_share
    interaction = _normal(seed, _INTERACTION, prompt_id, cases)
    z = np.asarray(mu, dtype=np.float64) + difficulty + unevenness * interaction
    return np.asarray(np.where(deterministic, (z > 0).astype(np.float64), ndtr(z)), np.float64)


# --- prompts and cases as text ------------------------------------------------------------------


def format_success(success: float) -> str:
    text = f"{success:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def format_prompt(text: str, prompt_id: int, success: float) -> str:
    """``text`` (any old tag removed) tagged as world prompt ``prompt_id`` with a true success."""
    if not 0.0 < success < 1.0:
        raise ValueError(f"a world prompt's success must lie in (0, 1), got {success}")
    if prompt_id < 0:
        raise ValueError(f"a world prompt id must be >= 0, got {prompt_id}")
    body = strip_tag(text)
    tag = f"[world prompt {prompt_id}: success {format_success(success)}]"
    return f"{body} {tag}" if body else tag


def parse_prompt(text: str, base_success: float) -> tuple[int, float]:
    """(prompt id, true success) of a prompt; untagged text is the base prompt (0, base_success).

    The tag may sit anywhere, e.g. inside a system message composed of rules and the task prompt;
    if there are several, the last one counts.
    """
    tags = _TAG.findall(text)
    if not tags:
        return 0, base_success
    prompt_id, success = tags[-1]
    value = float(success)
    if not 0.0 < value < 1.0:
        raise ValueError(f"a world prompt's success must lie in (0, 1), got {success}")
    return int(prompt_id), value


def strip_tag(text: str) -> str:
    return _TAG.sub("", text).strip()


def case_input(index: int) -> str:
    return f"World case {index}"


def case_index(text: str) -> int | None:
    """The case index named in an input, or None."""
    match = _CASE.search(text)
    return int(match.group(1)) if match else None


def case_answer(index: int) -> str:
    return f"w{index}"


def world_suite(
    n_learn: int = 40, n_gate: int = 200, n_holdout: int = 100, seed: int = 0
) -> dict[str, Any]:
    """A suite file's content (JSON-ready) for the world: disjoint learn, gate and holdout cases.

    The case indices are distinct, drawn by ``seed`` from the first million cases of the world,
    so different seeds give different (mostly disjoint) suites of the same world.
    """
    sizes = (n_learn, n_gate, n_holdout)
    if min(sizes) < 0:
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    rng = np.random.default_rng(seed)
    indices = [int(i) for i in rng.choice(1_000_000, size=sum(sizes), replace=False)]

    def cases(chunk: list[int]) -> list[dict[str, Any]]:
        return [
            {
                "id": f"world-{i}",
                "input": case_input(i),
                "check": {"kind": "exact", "expected": case_answer(i)},
            }
            for i in chunk
        ]

    return {
        "name": "world",
        "description": (
            "A FAKE world with a known ground truth (ratchet.world), for the scripted:world model: "
            "every case has a latent pass probability under every task prompt."
        ),
        "prompt": BASE_PROMPT,
        "learn": cases(indices[:n_learn]),
        "gate": cases(indices[n_learn : n_learn + n_gate]),
        "holdout": cases(indices[n_learn + n_gate :]),
        "source": f"ratchet.world.world_suite(seed={seed})",
    }


# --- the world ----------------------------------------------------------------------------------


class World:
    """One seeded world: latent pass probabilities of every case under every tagged prompt."""

    def __init__(self, settings: WorldSettings | None = None) -> None:
        self.settings = settings or WorldSettings()

    def parse(self, prompt_text: str) -> tuple[int, float]:
        return parse_prompt(prompt_text, self.settings.base_success)

    def true_success(self, prompt_text: str) -> float:
        """The prompt's success rate over the whole case population; exact, by construction."""
        return self.parse(prompt_text)[1]

    def level(self, success: Any) -> FloatArray:
        s = self.settings
        if isinstance(success, float | int):  # one prompt at a time (a chat model): cached
            return np.asarray(_level(float(success), s.deterministic_share, s.unevenness))
        return level_for(success, s.deterministic_share, s.unevenness)

    def deterministic(self, case_indices: Any) -> npt.NDArray[np.bool_]:
        """Which cases are deterministic (the rest are flaky)."""
        s = self.settings
        flags = _uniform(s.seed, _DETERMINISTIC, 0, case_indices) < s.deterministic_share
        return np.asarray(flags, dtype=np.bool_)

    def pass_probability(self, case_indices: Any, prompt_text: str) -> FloatArray:
        prompt_id, success = self.parse(prompt_text)
        return self.pass_probability_of(case_indices, prompt_id, success)

    def pass_probability_of(self, case_indices: Any, prompt_id: Any, success: Any) -> FloatArray:
        """As :meth:`pass_probability`, for prompt ids and successes as (arrays of) numbers."""
        s = self.settings
        return pass_probability(
            s.seed,
            case_indices,
            prompt_id,
            self.level(success),
            s.deterministic_share,
            s.unevenness,
        )

    def sample(
        self,
        case_indices: Any,
        prompt_text: str,
        rng: np.random.Generator,
        repeats: int = 1,
    ) -> IntArray:
        """Passes of each case in ``repeats`` independent runs."""
        p = self.pass_probability(case_indices, prompt_text)
        return np.asarray(rng.binomial(repeats, p), dtype=np.int64)


class FakeProposer:
    """A FAKE prompt proposer: each candidate is a new world prompt with a drawn true effect.

    Effects are in success-rate units (0.01 = one point), drawn from ``N(mean, sd)`` and clipped
    so the candidate's true success stays in [0.02, 0.98]; :meth:`candidate` makes one with a given
    effect. Candidate ids count up from ``first_id``.
    """

    def __init__(
        self,
        world: World,
        mean: float = -0.01,
        sd: float = 0.06,
        seed: int | None = 0,
        first_id: int = 1,
    ) -> None:
        self.world = world
        self.mean = mean
        self.sd = sd
        self.rng = np.random.default_rng(seed)
        self.next_id = first_id

    def propose(self, current_prompt_text: str) -> tuple[str, float]:
        """(candidate prompt text, its true effect on the success rate)."""
        return self.candidate(current_prompt_text, float(self.rng.normal(self.mean, self.sd)))

    def candidate(self, current_prompt_text: str, effect: float) -> tuple[str, float]:
        """A new prompt whose true success is the current one's plus ``effect`` (clipped)."""
        current = self.world.true_success(current_prompt_text)
        target = min(max(current + effect, MIN_SUCCESS), MAX_SUCCESS)
        text = format_prompt(current_prompt_text, self.next_id, target)
        self.next_id += 1
        return text, self.world.true_success(text) - current
