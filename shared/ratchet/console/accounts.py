"""The console's own state: its accounts and their sessions, in one file of its own.

``console.json`` in the Ratchet home, written 0600 (:func:`ratchet.natsconf.write_secret`) and
read and changed under a lock, so ``ratchet console user add`` and a running console can both
change it. No service reads it, and the console reads no service's tables: this file is all the
console keeps.

Passwords are bcrypt hashes (cost 12: these are people's passwords, unlike the random NATS
tokens of :mod:`ratchet.natsconf`). A session is a random token held by the browser in an
HttpOnly cookie; the file keeps only its SHA-256, its expiry and its CSRF token, so a copy of the
file logs nobody in. A session names its account, whose role is read again on every request: a
reviewer made a viewer, or removed, loses the right at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import bcrypt
from pydantic import AwareDatetime, BaseModel, Field

from ratchet.contracts import APPROVER_NAME, utcnow
from ratchet.natsconf import write_secret

CONSOLE_FILE = "console.json"
Role = Literal["reviewer", "viewer"]
ROLES: tuple[Role, ...] = ("reviewer", "viewer")
PASSWORD_COST = 12
MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_BYTES = 72  # what bcrypt reads; a longer one would be cut without a word
MAX_SESSIONS = 1_000  # beyond it the new session's name gives up its oldest first, then anyone's
# Checked when a name is unknown, so a wrong name costs as long as a wrong password.
_NOBODY = bcrypt.hashpw(b"nobody has this password", bcrypt.gensalt(PASSWORD_COST))


class AccountError(ValueError):
    """A name, role or password that cannot be used; the message says why in one line."""


class Account(BaseModel):
    name: str = Field(pattern=APPROVER_NAME)
    role: Role
    password_hash: str | None = Field(
        default=None, description="None: logs in only through the trusted proxy."
    )
    created_at: AwareDatetime = Field(default_factory=utcnow)


class Session(BaseModel):
    name: str
    csrf: str
    expires: AwareDatetime
    proxy_role: Role | None = Field(
        default=None,
        description="A session the trusted proxy opened for a name without an account: the "
        "role the console gives such names. An account's own role always wins.",
    )
    via: Literal["password", "proxy"] = Field(
        default="password",
        description="proxy: opened for the trusted proxy's identity header; a name has at most "
        "one, which every request the proxy sends for that name without a cookie shares.",
    )


class ConsoleState(BaseModel):
    accounts: dict[str, Account] = Field(default_factory=dict)
    sessions: dict[str, Session] = Field(
        default_factory=dict, description="By the SHA-256 of the session's token."
    )


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    """A reviewer's name becomes a subject token (``change.approved.console.<name>``), so it
    follows the approver name rule."""
    if not re.fullmatch(APPROVER_NAME, name):
        raise AccountError(
            f"{name!r} is not a console name: lowercase letters, digits, - and _, at most 32, "
            "starting with a letter or digit"
        )
    return name


def check_password(password: str) -> bytes:
    encoded = password.encode()
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(encoded) > MAX_PASSWORD_BYTES:
        raise AccountError(f"a password may have at most {MAX_PASSWORD_BYTES} bytes (bcrypt's)")
    return encoded


class Accounts:
    """The console's accounts and sessions in ``path``; every method reads the file afresh."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(f".{path.name}.lock")

    @classmethod
    def in_home(cls, home: Path) -> Accounts:
        return cls(home / CONSOLE_FILE)

    @contextmanager
    def _locked(self, *, write: bool) -> Iterator[ConsoleState]:
        """The state, under the file's lock; written back (0600) when ``write``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                state = ConsoleState()
            else:
                state = ConsoleState.model_validate_json(text)
            yield state
            if write:
                write_secret(self.path, state.model_dump_json(indent=2))

    # --- accounts, as `ratchet console user` changes them --------------------------------------

    def add(self, name: str, role: Role, password: str | None, *, replace: bool = False) -> Account:
        check_name(name)
        if role not in ROLES:
            raise AccountError(f"role {role!r}: choose one of {', '.join(ROLES)}")
        hashed = (
            bcrypt.hashpw(check_password(password), bcrypt.gensalt(PASSWORD_COST)).decode()
            if password is not None
            else None
        )
        account = Account(name=name, role=role, password_hash=hashed)
        with self._locked(write=True) as state:
            if name in state.accounts and not replace:
                raise AccountError(f"account {name!r} exists (--replace to change it)")
            state.accounts[name] = account
            _end_sessions_of(state, name)  # a changed account logs in again
        return account

    def remove(self, name: str) -> None:
        with self._locked(write=True) as state:
            if state.accounts.pop(name, None) is None:
                raise AccountError(f"no account {name!r}")
            _end_sessions_of(state, name)

    def every(self) -> list[Account]:
        with self._locked(write=False) as state:
            return sorted(state.accounts.values(), key=lambda a: a.name)

    def get(self, name: str) -> Account | None:
        with self._locked(write=False) as state:
            return state.accounts.get(name)

    # --- logging in ----------------------------------------------------------------------------

    def authenticate(self, name: str, password: str) -> Account | None:
        """The account if ``password`` is its password; None otherwise, after as much work as a
        real check (an unknown name, or one without a password, is not told apart)."""
        account = self.get(name)
        encoded = password.encode()[:MAX_PASSWORD_BYTES]
        stored = account.password_hash.encode() if account and account.password_hash else None
        matches = bcrypt.checkpw(encoded, stored or _NOBODY)
        return account if matches and stored is not None else None

    def open_session(
        self,
        name: str,
        lifetime: timedelta,
        *,
        proxy_role: Role | None = None,
        via: Literal["password", "proxy"] = "password",
    ) -> tuple[str, Session]:
        """A new session for ``name``: the token for the cookie, and the session. Only the
        trusted proxy opens one for a name without an account (``proxy_role``).

        When the file holds ``MAX_SESSIONS``, ``name``'s own sessions make room first (soonest
        to end first), so one person signing in again and again ends only their own sessions;
        only a name with none ends whichever session ends soonest."""
        token = secrets.token_urlsafe(32)
        session = Session(
            name=name,
            csrf=secrets.token_urlsafe(32),
            expires=utcnow() + lifetime,
            proxy_role=proxy_role,
            via=via,
        )
        with self._locked(write=True) as state:
            now = utcnow()
            state.sessions = {
                k: s
                for k, s in state.sessions.items()
                if s.expires > now and not (via == "proxy" and s.via == "proxy" and s.name == name)
            }  # the proxy's session for a name is one, even when two first requests race
            while len(state.sessions) >= MAX_SESSIONS:
                own = [k for k, s in state.sessions.items() if s.name == name]
                oldest = min(own or list(state.sessions), key=lambda k: state.sessions[k].expires)
                del state.sessions[oldest]
            state.sessions[_digest(token)] = session
        return token, session

    def proxy_session(
        self, name: str, lifetime: timedelta, *, proxy_role: Role | None
    ) -> tuple[str | None, Session]:
        """The session for a request the trusted proxy sent for ``name`` without a cookie: the
        name's live proxy session as it is (no token, and the file is not written), else a new
        one with its token. So however many such requests come, a name has one proxy session
        and nobody else's session ends for them."""
        with self._locked(write=False) as state:
            now = utcnow()
            live = next(
                (
                    s
                    for s in state.sessions.values()
                    if s.via == "proxy" and s.name == name and s.expires > now
                ),
                None,
            )
        if live is not None:
            return None, live
        return self.open_session(name, lifetime, proxy_role=proxy_role, via="proxy")

    def session(self, token: str, now: datetime | None = None) -> tuple[Session, Role] | None:
        """The live session of ``token`` and the role it has now (its account's); None if the
        session ended or its account is gone."""
        with self._locked(write=False) as state:
            session = state.sessions.get(_digest(token))
            if session is None or session.expires <= (now or utcnow()):
                return None
            account = state.accounts.get(session.name)
        role = account.role if account is not None else session.proxy_role
        return (session, role) if role is not None else None

    def close_session(self, token: str) -> None:
        with self._locked(write=True) as state:
            state.sessions.pop(_digest(token), None)


def _end_sessions_of(state: ConsoleState, name: str) -> None:
    state.sessions = {k: s for k, s in state.sessions.items() if s.name != name}


def same_token(given: str | None, expected: str) -> bool:
    """Whether a form's CSRF token is the session's, compared in constant time."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
