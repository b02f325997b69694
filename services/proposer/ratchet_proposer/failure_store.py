"""The proposer's view of the failures: it asks the failure store, which owns them.

The proposer opens no database of the failure store's: every read is a ``query.*`` request over
NATS, so the two can run on different hosts. A request that gets no answer in time, or an answer
that does not parse, is a :class:`FailureStoreError` with one line saying which.
"""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

import nats.errors
from faststream.nats import NatsBroker
from pydantic import BaseModel, TypeAdapter, ValidationError

from ratchet.contracts import FailureGroup
from ratchet.messaging import QUERY_PREFIX
from ratchet.queries import FailureCount
from ratchet.store import FailureQuery, FailureRecord
from ratchet_proposer.proposer import ProposalError

QUERY_TIMEOUT_S = 10.0
T = TypeVar("T")
FAILURES = TypeAdapter(list[FailureRecord])
GROUPS = TypeAdapter(list[FailureGroup])
COUNT = TypeAdapter(int)


class FailureStoreError(ProposalError):
    """The failure store did not answer, or answered something that is not a reply."""


class FailureStoreClient:
    """``query.failures`` and ``query.groups``, asked through the proposer's own broker."""

    def __init__(self, broker: NatsBroker, *, timeout_s: float = QUERY_TIMEOUT_S) -> None:
        self.broker = broker
        self.timeout_s = timeout_s

    async def failures(self, query: FailureQuery) -> list[FailureRecord]:
        return await self._ask("failures", query, FAILURES)

    async def groups(self, query: FailureQuery) -> list[FailureGroup]:
        return await self._ask("groups", query, GROUPS)

    async def count(self, task: str, since: datetime | None) -> int:
        return await self._ask("count", FailureCount(task=task, since=since), COUNT)

    async def _ask(self, name: str, query: BaseModel, answer: TypeAdapter[T]) -> T:
        subject = f"{QUERY_PREFIX}.{name}"
        try:
            reply = await self.broker.request(query, subject, timeout=self.timeout_s)
        except (TimeoutError, nats.errors.Error) as exc:
            raise FailureStoreError(
                f"the failure store did not answer {subject} within {self.timeout_s:.0f} s "
                f"({type(exc).__name__}): is it running?"
            ) from exc
        try:
            return answer.validate_json(reply.body)
        except ValidationError as exc:  # not let through: the caller's message is not at fault
            raise FailureStoreError(
                f"the failure store sent an unexpected reply on {subject}: {reply.body[:200]!r}"
            ) from exc
