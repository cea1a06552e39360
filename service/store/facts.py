"""What building a study's result needs from the store, as the store hands it over.

Its own module because two writers produce it: :meth:`service.store.results.Results.context` reads it for
any study, and the ingest (:mod:`service.store.rows`) returns it for a study it has just created, where
nothing needs reading (no earlier result, received now). The worker turns it into the pure
:class:`service.results.build.StudyFacts` (``store/`` never imports ``results/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["ResultContext"]


@dataclass(frozen=True)
class ResultContext:
    """What building a study's result needs from the store."""

    accession_number: str | None
    first_received: datetime | None
    last_received: datetime | None
    supersedes: str | None
    """The study's newest result before this one, which the new result replaces."""
