"""Policy approver service: ``change.awaiting_approval`` in, ``change.approved.policy`` or
``change.rejected.policy`` out, decided by the rule a person chose (``settings.approver_rule``,
named in each reason). It connects as the NATS user ``approver-policy``, the only user allowed to
publish those two subjects, so the audit trail's "policy" is proven by the server. Optional:
people decide unless someone runs it (``ratchet approver``)."""

from __future__ import annotations

from faststream import FastStream
from faststream.specification import AsyncAPI

from ratchet.contracts import ChangeApproved, ChangeAwaitingApproval, ChangeRejected
from ratchet.messaging import durable_subscriber, event_publisher, make_broker, publish
from ratchet.natsconf import POLICY_APPROVER
from ratchet.settings import Settings, get_settings
from ratchet_approver.policy import parse_rule, policy_decision


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or get_settings()
    rule = settings.approver_rule
    parse_rule(rule)  # an unknown rule fails here, before connecting
    broker = make_broker(settings, name="policy-approver")
    approved = event_publisher(
        broker, ChangeApproved, subject=ChangeApproved.subject_of(POLICY_APPROVER)
    )
    rejected = event_publisher(
        broker, ChangeRejected, subject=ChangeRejected.subject_of(POLICY_APPROVER)
    )

    @durable_subscriber(
        broker,
        ChangeAwaitingApproval.subject,
        durable="policy-approver",
        settings=settings,
        description="Decide by the rule from the gate's evidence; the decision names its hash.",
    )
    async def decide(waiting: ChangeAwaitingApproval) -> None:
        ok, why = policy_decision(waiting.measurement, rule)
        decision_type = ChangeApproved if ok else ChangeRejected
        decision = decision_type(
            id=f"{waiting.change_id}.decision",
            change_id=waiting.change_id,
            reason=f"rule {rule}: {why}",
            evidence_sha256=waiting.evidence_sha256,
        )
        await publish(approved if ok else rejected, decision)

    return FastStream(
        broker,
        specification=AsyncAPI(
            title="Ratchet policy approver",
            description="Decides waiting changes by a rule a person chose, as the approver named "
            "policy.",
        ),
    )
