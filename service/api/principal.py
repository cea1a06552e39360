"""Who made a request: :class:`Principal` (a name for the audit trail and logs, a role, how it signed in).

Kept apart from :mod:`service.api.auth` so that the token table, the OIDC verifier
(:mod:`service.api.oidc`) and the routes that record an actor all share one definition without importing
each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["ANONYMOUS", "ROLES", "Principal", "Role", "Via", "check_name"]

Role = Literal["reader", "admin"]
"""In ascending order of privilege: each role may do what the ones before it may."""

ROLES: tuple[Role, ...] = get_args(Role)

Via = Literal["token", "oidc", "open"]
"""How the principal was established: a static token, an OIDC JWT, or none at all (``auth.open``)."""

_NAME_RE = re.compile(r"[A-Za-z0-9._@:+-]{1,64}")


def check_name(name: str) -> str | None:
    """Why ``name`` cannot name a principal (None when it can): it goes into logs and the audit trail."""
    if not _NAME_RE.fullmatch(name):
        return "a name is 1 to 64 letters, digits or . _ @ : + -"
    return None


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: ``name`` is what the audit trail records as the actor of a write."""

    name: str
    role: Role
    via: Via = "token"

    def allows(self, needed: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(needed)

    @property
    def actor(self) -> str:
        """The audit actor: the token's or the user's name; ``oidc:`` marks a person signed in by OIDC,
        so a static token named like a radiologist can never pass for one."""
        return f"oidc:{self.name}" if self.via == "oidc" else self.name


ANONYMOUS = Principal("anonymous", "admin", "open")
"""The caller when ``auth.open`` is set: nothing is checked, and the audit trail says so."""
