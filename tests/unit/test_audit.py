"""The audit trail's checks on their own: what an auditor holding an export of the trail, the
gatekeeper's public key and the stream's newest anchor can tell.

Each attack is done as someone who can write the database but does not hold the signing key:
edit a record and recompute the chain, delete one and renumber the rest, append a correctly
chained forgery, or cut off the newest records.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from ratchet.audit import (
    GENESIS_HASH,
    MAX_LISTED,
    PUBLIC_KEY_FILE,
    UNSIGNED,
    AuditKey,
    AuditKeyError,
    AuditSigner,
    TrailReport,
    anchor_of,
    announcement,
    newest_anchor,
    record_hash,
    seq_ranges,
    verify_chain,
    verify_trail,
)
from ratchet.contracts import AuditAnchor
from ratchet.store import AuditRecord

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SIGNER = AuditSigner.generate()
KEY = SIGNER.key


def rechained(
    records: list[AuditRecord], signer: AuditSigner | None = None, start: int = 0
) -> list[AuditRecord]:
    """``records`` with seq, prev_hash and hash recomputed from ``start`` on, as a forger with
    write access to the database would; signed by ``signer`` if given, else keeping the old
    signatures (the forger has no key)."""
    out = records[:start]
    prev_hash = out[-1].hash if out else GENESIS_HASH
    for seq, record in enumerate(records[start:], start=start + 1):
        digest = record_hash(
            prev_hash,
            seq,
            record.change_id,
            record.kind,
            record.actor,
            record.payload,
            record.at,
        )
        update: dict[str, Any] = {"seq": seq, "prev_hash": prev_hash, "hash": digest}
        if signer is not None:
            update |= {"key_id": signer.key.id, "signature": signer.sign(digest)}
        out.append(record.model_copy(update=update))
        prev_hash = digest
    return out


def chain(length: int, signer: AuditSigner | None = SIGNER) -> list[AuditRecord]:
    """A trail of ``length`` records as the gatekeeper writes it (unsigned: as before signing)."""
    records = [
        AuditRecord(
            seq=seq,
            change_id="c1",
            kind="measured",
            actor="gatekeeper",
            payload={"step": seq, "scores": {"a": 1.0, "b": None}},
            at=T0 + timedelta(seconds=seq),
            prev_hash="",
            hash="",
        )
        for seq in range(1, length + 1)
    ]
    return rechained(records, signer)


# --- the hash chain ------------------------------------------------------------------------------


def test_hash_ignores_key_order_and_timezone_spelling() -> None:
    utc = record_hash(GENESIS_HASH, 1, "c1", "decided", "alice", {"a": 1, "b": [1, 2]}, T0)
    elsewhere = record_hash(
        GENESIS_HASH,
        1,
        "c1",
        "decided",
        "alice",
        {"b": [1, 2], "a": 1},
        T0.astimezone(timezone(timedelta(hours=-5))),
    )

    assert utc == elsewhere
    assert len(utc) == 64 and set(utc) <= set("0123456789abcdef")


@pytest.mark.parametrize(
    "changed",
    [
        {"prev_hash": "1" * 64},
        {"seq": 2},
        {"change_id": "c2"},
        {"kind": "applied"},
        {"actor": "mallory"},
        {"payload": {"approved": False}},
        {"at": T0 + timedelta(microseconds=1)},
    ],
    ids=lambda changed: next(iter(changed)),
)
def test_every_field_is_covered_by_the_hash(changed: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "prev_hash": GENESIS_HASH,
        "seq": 1,
        "change_id": "c1",
        "kind": "decided",
        "actor": "alice",
        "payload": {"approved": True},
        "at": T0,
    }

    assert record_hash(**fields) != record_hash(**(fields | changed))


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="no timezone"):
        record_hash(GENESIS_HASH, 1, "c1", "decided", "alice", {}, datetime(2025, 3, 1, 12, 0))


def test_intact_chain_has_no_problems_in_any_order() -> None:
    records = chain(5)

    assert verify_chain(records) == []
    assert verify_chain(list(reversed(records))) == []
    assert verify_chain([]) == []


def test_altered_record_is_named_by_seq() -> None:
    records = chain(5)
    records[2] = records[2].model_copy(update={"payload": {"step": 3, "scores": {"a": 0.0}}})

    assert verify_chain(records) == [
        "seq 3: content altered (its hash no longer matches)",
    ]


def test_rewritten_record_with_a_fresh_hash_breaks_the_next_link() -> None:
    records = chain(4)
    forged = records[1].model_copy(update={"actor": "mallory"})
    records[1] = forged.model_copy(
        update={
            "hash": record_hash(
                forged.prev_hash,
                forged.seq,
                forged.change_id,
                forged.kind,
                forged.actor,
                forged.payload,
                forged.at,
            )
        }
    )

    assert verify_chain(records) == ["seq 3: does not link to seq 2 (seq 2 was rewritten)"]


@pytest.mark.parametrize(
    ("removed", "problem"),
    [
        ([2], "gap: seq 3 missing (removed) before seq 4"),
        ([1, 2], "gap: seq 2 to 3 missing (removed) before seq 4"),
        ([0], "gap: seq 1 missing (removed) before seq 2"),
    ],
)
def test_removed_records_are_reported_as_a_gap(removed: list[int], problem: str) -> None:
    records = [r for i, r in enumerate(chain(5)) if i not in removed]

    assert verify_chain(records) == [problem]


def test_duplicated_seq_is_reported() -> None:
    records = chain(3)

    assert verify_chain([*records, records[1]]) == ["seq 2: appears more than once"]


def test_first_record_must_start_from_genesis() -> None:
    [first] = chain(1)
    prev_hash = "f" * 64
    moved = first.model_copy(
        update={
            "prev_hash": prev_hash,
            "hash": record_hash(
                prev_hash, 1, first.change_id, first.kind, first.actor, first.payload, first.at
            ),
        }
    )

    assert verify_chain([moved]) == ["seq 1: does not start from the genesis hash"]


# --- the four attacks, against chain, signatures and anchor ---------------------------------------


def test_an_untouched_signed_and_anchored_trail_verifies_clean() -> None:
    records = chain(5)

    assert verify_trail(records, KEY, anchor_of(records[-1])) == TrailReport()
    assert verify_trail([], KEY, None) == TrailReport()


def test_edit_and_recompute_the_chain_fails_every_signature_from_the_edit_on() -> None:
    records = chain(6)
    records[2] = records[2].model_copy(update={"actor": "mallory"})
    forged = rechained(records, start=2)  # a consistent chain again, the old signatures kept

    assert verify_chain(forged) == []  # the chain alone no longer shows it
    assert verify_trail(forged, KEY, anchor_of(records[-1])).problems == [
        "seq 3 to 6: signature does not match (rewritten or forged after signing)",
        "seq 6: not the record anchored in the stream (rewritten)",
    ]


def test_delete_and_renumber_fails_the_signatures_and_the_anchor() -> None:
    records = chain(6)
    anchor = anchor_of(records[-1])
    forged = rechained([r for r in records if r.seq != 3], start=2)

    assert verify_chain(forged) == []
    assert verify_trail(forged, KEY, anchor).problems == [
        "seq 3 to 5: signature does not match (rewritten or forged after signing)",
        "truncated: the trail ends at seq 5, but the stream anchored seq 6 (records removed: "
        "seq 6 at least)",
    ]


@pytest.mark.parametrize(
    ("signer", "problem"),
    [
        (None, UNSIGNED),
        ("copied", "signature does not match (rewritten or forged after signing)"),
        ("own", "signed by another key (id {mallory!r}), not key {key}"),
    ],
)
def test_a_correctly_chained_forged_append_is_named(signer: str | None, problem: str) -> None:
    """A forged approval appended after the anchored head: unsigned, with a signature copied
    from a real record, or signed with the forger's own key."""
    records = chain(4)
    mallory = AuditSigner.generate()
    approval = records[-1].model_copy(
        update={"kind": "approved", "actor": "mallory", "payload": {"reason": "trust me"}}
    )
    [forged] = rechained([*records, approval], mallory if signer == "own" else None, start=4)[4:]
    if signer is None:
        forged = forged.model_copy(update={"key_id": None, "signature": None})

    report = verify_trail([*records, forged], KEY, anchor_of(records[-1]))

    assert report.problems == [f"seq 5: {problem.format(mallory=mallory.key.id, key=KEY.id)}"]


def test_deleting_the_newest_records_is_seen_against_the_anchor() -> None:
    records = chain(5)

    report = verify_trail(records[:3], KEY, anchor_of(records[-1]))

    assert verify_chain(records[:3]) == []
    assert report.problems == [
        "truncated: the trail ends at seq 3, but the stream anchored seq 5 (records removed: "
        "seq 4 to 5 at least)"
    ]


def test_stripping_every_signature_and_rewriting_is_seen_against_the_anchor() -> None:
    """Passing the whole trail off as written before signing does not help the forger."""
    records = chain(4)
    stripped = [
        r.model_copy(update={"key_id": None, "signature": None, "actor": "mallory"})
        for r in records
    ]
    forged = rechained(stripped)

    report = verify_trail(forged, KEY, anchor_of(records[-1]))

    assert report.problems == [
        f"seq 1 to 4: {UNSIGNED}",
        "seq 4: not the record anchored in the stream (rewritten)",
    ]


def test_stripping_every_signature_then_appending_a_forgery_is_named() -> None:
    """The reviewer's attack: three signed records, the stream anchoring seq 3; every signature
    stripped and a correctly chained approval by alice appended. Unsigned records were once
    accepted as "written before signing" whenever no record was signed; now each one counts."""
    records = chain(3)
    anchor = anchor_of(records[-1])
    stripped = [r.model_copy(update={"key_id": None, "signature": None}) for r in records]
    approval = stripped[-1].model_copy(
        update={"kind": "approved", "actor": "alice", "payload": {"approver": "alice"}}
    )
    forged = rechained([*stripped, approval], start=3)

    report = verify_trail(forged, KEY, anchor)
    # the gatekeeper, had it not refused, would have signed a record onto the forgery
    [appended] = rechained([*forged, chain(1)[0]], SIGNER, start=4)[4:]
    later = verify_trail([*forged, appended], KEY, anchor_of(appended))

    assert verify_chain(forged) == [] and anchor.seq == 3
    assert report.problems == [f"seq 1 to 4: {UNSIGNED}"]
    assert report.notes == [
        "seq 4: newer than the stream's anchor (seq 3), so their signatures alone vouch for "
        "them, and records cut off after them would not show"
    ]
    assert later.problems == [f"seq 1 to 4: {UNSIGNED}"] and later.notes == []


def test_an_unsigned_anchor_is_a_problem() -> None:
    """An anchor counts only signed by the key: one without a signature proves nothing."""
    records = chain(3)
    unsigned = anchor_of(records[-1]).model_copy(update={"key_id": None, "signature": None})

    assert verify_trail(records, KEY, unsigned).problems == [
        "the stream's anchor (seq 3) is unsigned"
    ]
    assert verify_trail(records, None, unsigned).problems == [
        "the stream's anchor (seq 3) is unsigned"
    ]


def test_a_record_signed_by_a_replaced_key_is_named() -> None:
    """The gatekeeper's key replaced (say its home lost): a pinned key shows which records."""
    records = chain(3)
    records += rechained([*records, chain(1)[0]], AuditSigner.generate(), start=3)[3:]

    report = verify_trail(records, KEY, anchor_of(records[-1]))

    assert len(report.problems) == 2
    assert report.problems[0].startswith("seq 4: signed by another key")
    assert report.problems[1] == f"the stream's anchor (seq 4) is not signed by key {KEY.id}"


# --- unsigned records, anchors missing or behind -------------------------------------------------


def test_unsigned_records_are_problems_even_before_signed_ones() -> None:
    """Nothing tells records written before signing from records whose signatures were removed,
    so none is accepted unsigned: each is named."""
    unsigned = chain(3, signer=None)
    records = [*unsigned, *rechained([*unsigned, *chain(2)], SIGNER, start=3)[3:]]

    report = verify_trail(records, KEY, anchor_of(records[-1]))

    assert report.problems == [f"seq 1 to 3: {UNSIGNED}"]
    assert report.notes == []


def test_a_trail_never_signed_fails_with_or_without_a_key() -> None:
    records = chain(3, signer=None)
    anchored = anchor_of(chain(3)[-1])  # the same hashes, signed: the anchor itself is valid

    assert verify_trail(records, KEY, anchored).problems == [f"seq 1 to 3: {UNSIGNED}"]
    assert verify_trail(records, None, anchored) == TrailReport(
        problems=[f"seq 1 to 3: {UNSIGNED}"],
        notes=["no public key: the signatures were not checked"],
    )


def test_a_trail_without_an_anchor_is_a_problem_and_records_after_it_a_note() -> None:
    records = chain(4)

    unanchored = verify_trail(records, KEY, None)
    behind = verify_trail(records, KEY, anchor_of(records[1]))

    assert unanchored.problems == [
        "no valid anchor of the trail in the RATCHET stream, so its end cannot be checked (the "
        "gatekeeper anchors its head with every record, at start and daily)"
    ]
    assert behind == TrailReport(
        notes=[
            "seq 3 to 4: newer than the stream's anchor (seq 2), so their signatures alone "
            "vouch for them, and records cut off after them would not show"
        ]
    )
    assert verify_trail(records, None, anchor_of(records[2])).notes == [
        "no public key: the signatures were not checked",
        "seq 4: newer than the stream's anchor (seq 3), so nothing vouches for them, and "
        "records cut off after them would not show",
    ]


def test_without_a_key_only_the_chain_and_anchor_are_checked() -> None:
    records = chain(2)

    assert verify_trail(records, None, anchor_of(records[-1])) == TrailReport(
        notes=["no public key: the signatures were not checked"]
    )


def test_problem_lists_stay_short() -> None:
    seqs = list(range(1, 4 * MAX_LISTED, 2))  # no two adjacent: one range each

    text = seq_ranges(seqs)

    assert text.startswith("seq 1, 3, 5") and text.endswith(
        f"and {len(seqs) - MAX_LISTED} more range(s)"
    )
    assert seq_ranges([1, 2, 3, 7, 9, 10]) == "seq 1 to 3, 7, 9 to 10"


# --- the anchor in the stream ---------------------------------------------------------------------


def recorded(record: AuditRecord) -> bytes:
    """The ``change.recorded`` the gatekeeper publishes for ``record``, as stored."""
    return announcement(record).model_dump_json().encode()


async def newest_first(messages: list[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """``messages`` (oldest first, at stream seqs 1, 2, ...) as the stream is read back."""
    for stream_seq in range(len(messages), 0, -1):
        yield stream_seq, messages[stream_seq - 1]


async def test_garbage_on_change_recorded_is_walked_past_to_the_newest_valid_anchor() -> None:
    """Garbage after the newest anchor once read as "no anchor", and a cut went unseen."""
    records = chain(3)
    other, unsigned = AuditSigner.generate(), records[2].model_copy(update={"signature": None})
    messages = [
        recorded(records[0]),
        recorded(records[1]),
        b"not json",
        recorded(rechained(records, other)[2]),  # a head signed by another key
        b'{"records": []}',  # a query's answer, say
        recorded(unsigned),
    ]

    reading = await newest_anchor(newest_first(messages), KEY)
    report = verify_trail(records[:2], KEY, reading.head)

    assert reading.head == anchor_of(records[1]) and not reading.unreadable
    assert reading.problems == [
        "change.recorded at stream seq 6: not a valid anchor (its head is unsigned)",
        "change.recorded at stream seq 3, 5: not a valid anchor (not a change.recorded event "
        "carrying the trail's head)",
        f"change.recorded at stream seq 4: not a valid anchor (its head is not signed by key "
        f"{KEY.id})",
    ]
    assert report == TrailReport()  # the trail itself matches the anchor read


async def test_a_stream_with_no_valid_anchor_cannot_be_checked() -> None:
    """Not the same as a stream without any ``change.recorded`` (a new one): that has no anchor
    yet; this one had anchors and hides them, or the walk's bound ends before one."""
    garbage = [b"{}"] * 5

    empty = await newest_anchor(newest_first([]), KEY)
    hidden = await newest_anchor(newest_first([recorded(chain(1)[0]), *garbage]), KEY, limit=5)

    assert (empty.head, empty.unreadable, empty.problems) == (None, False, [])
    assert hidden.head is None and hidden.unreadable
    assert hidden.summary() == (
        "none of the newest 5 change.recorded message(s) in the RATCHET stream is a valid "
        "anchor (change.recorded at stream seq 2 to 6: not a valid anchor (not a change.recorded "
        "event carrying the trail's head))"
    )


async def test_without_a_key_the_newest_signed_anchor_is_taken() -> None:
    records = chain(2)
    unsigned = recorded(records[1].model_copy(update={"signature": None}))

    reading = await newest_anchor(newest_first([recorded(records[0]), unsigned]), None)

    assert reading.head == anchor_of(records[0])


# --- keys ----------------------------------------------------------------------------------------


def test_a_signature_covers_the_hash_and_only_this_key_makes_it() -> None:
    [record] = chain(1)
    assert record.signature is not None

    assert KEY.verifies(record.hash, record.signature)
    assert not KEY.verifies("0" * 64, record.signature)
    assert not AuditSigner.generate().key.verifies(record.hash, record.signature)
    assert not KEY.verifies(record.hash, "not base64!")


def test_a_public_key_reads_back_from_its_text() -> None:
    assert AuditKey.parse(KEY.text) == KEY
    assert AuditKey.parse(f"  {KEY.text}\n") == KEY
    assert KEY.text.startswith("ed25519:") and len(KEY.id) == 16


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("ssh-ed25519 AAAA", "not an audit key"),
        ("ed25519:***", "not valid base64"),
        ("ed25519:AAAA", "has 3 bytes"),
    ],
)
def test_a_malformed_public_key_is_one_clear_error(text: str, error: str) -> None:
    with pytest.raises(AuditKeyError, match=error):
        AuditKey.parse(text)


def test_the_signing_key_is_made_once_owner_only_with_its_public_half_beside(
    tmp_path: Path,
) -> None:
    path = tmp_path / "home" / "key.pem"

    made = AuditSigner.load_or_create(path)
    again = AuditSigner.load_or_create(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert again.key == made.key
    assert (path.parent / PUBLIC_KEY_FILE).read_text().strip() == made.key.text
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["key.pem", PUBLIC_KEY_FILE])


def test_a_signing_key_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    AuditSigner.load_or_create(path)
    os.chmod(path, 0o644)

    with pytest.raises(AuditKeyError, match=r"may be read by others .*chmod 600"):
        AuditSigner.load_or_create(path)


def test_a_damaged_signing_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"")
    os.chmod(path, 0o600)

    with pytest.raises(AuditKeyError, match="not a readable key"):
        AuditSigner.load_or_create(path)


def test_an_anchor_holds_seq_hash_and_signature_of_the_head() -> None:
    records = chain(2)

    assert anchor_of(records[-1]) == AuditAnchor(
        seq=2, hash=records[-1].hash, key_id=KEY.id, signature=records[-1].signature
    )
