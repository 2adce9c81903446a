"""The one retry policy of compare-and-swap: re-read, re-decide, commit, a bounded number of times.

Every guarded write that can lose a race (an operator's edit, a fence claim,
an absence note, the node's record re-asserted, a block given up or claimed
for the warm reserve) runs its rounds through :func:`retry_cas`: a round
reads what it needs, decides and commits, and returns :data:`LOST_RACE` when
a guard failed; the next round starts from fresh reads after a short random
pause. The only loop beside it is the engine's group commit, which re-plans
from the failed transaction's own answer instead of re-reading, and counts
its lost races against the same :data:`CAS_ATTEMPTS`.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable
from typing import Final, Literal, TypeVar

from ..core.errors import Conflict

R = TypeVar("R")

#: Rounds a guarded write may lose before it gives up with Conflict (retriable).
#: Generous: a round that loses is rare and cheap next to a caller's own retry.
CAS_ATTEMPTS: Final = 32


class _Lost(enum.Enum):
    LOST_RACE = "lost race"


#: What a round returns when one of its guards failed: run it again from fresh reads.
LOST_RACE: Final = _Lost.LOST_RACE
LostRace = Literal[_Lost.LOST_RACE]


async def backoff(attempt: int) -> None:
    """A short random pause before retry ``attempt`` (none before the first retry)."""
    if attempt >= 1:
        await asyncio.sleep(random.uniform(0, min(0.002 * attempt, 0.05)))


async def retry_cas(round_: Callable[[], Awaitable[R | LostRace]], what: str) -> R:
    """Run ``round_`` until it returns a value (not :data:`LOST_RACE`), at most
    :data:`CAS_ATTEMPTS` times; then :class:`Conflict` names ``what``.

    Errors a round raises propagate at once: only a lost race is retried.
    """
    for attempt in range(CAS_ATTEMPTS):
        outcome = await round_()
        if not isinstance(outcome, _Lost):
            return outcome
        await backoff(attempt)
    raise Conflict(f"{what} changed concurrently {CAS_ATTEMPTS} times; try again")
