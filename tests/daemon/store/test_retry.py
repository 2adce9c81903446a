"""The one CAS retry policy: bounded, only lost races retried (no etcd)."""

from __future__ import annotations

import pytest

from topoipam.daemon.core.errors import Conflict, InvalidInput
from topoipam.daemon.store import CAS_ATTEMPTS, LOST_RACE, LostRace, retry_cas


@pytest.mark.asyncio
async def test_a_round_that_wins_returns_its_value_even_none() -> None:
    rounds: list[int] = []

    async def round_() -> int | None | LostRace:
        rounds.append(1)
        return LOST_RACE if len(rounds) < 3 else None

    assert await retry_cas(round_, "x") is None
    assert len(rounds) == 3


@pytest.mark.asyncio
async def test_rounds_that_keep_losing_end_in_conflict_naming_what() -> None:
    rounds: list[int] = []

    async def round_() -> int | LostRace:
        rounds.append(1)
        return LOST_RACE

    with pytest.raises(Conflict, match=f"pool p changed concurrently {CAS_ATTEMPTS} times"):
        await retry_cas(round_, "pool p")
    assert len(rounds) == CAS_ATTEMPTS


@pytest.mark.asyncio
async def test_an_error_in_a_round_is_not_retried() -> None:
    rounds: list[int] = []

    async def round_() -> int | LostRace:
        rounds.append(1)
        raise InvalidInput("bad manifest")

    with pytest.raises(InvalidInput):
        await retry_cas(round_, "x")
    assert rounds == [1]
