"""
Tracker accounts for tests: users made straight in the store, with a cheap
scrypt cost (the hash names its cost, so the tracker checks it as written).
"""

from __future__ import annotations

import functools

from meshstream.tracker import auth
from meshstream.tracker.client import Credentials
from meshstream.tracker.store import TrackerStore

PASSWORD = "correct horse battery staple"
#: log2(N)=4: a few microseconds instead of 50 ms per check.
TEST_COST = (4, 8, 1)


@functools.cache
def hashed(password: str = PASSWORD) -> str:
    return auth.hash_password(password, TEST_COST)


async def make_user(
    store: TrackerStore,
    name: str,
    role: str = auth.USER,
    quota_bytes: int | None = None,
    password: str = PASSWORD,
) -> Credentials:
    """Create a user (it must not exist); return its credentials."""
    created = await store.add_user(name, hashed(password), role, 0.0, quota_bytes)
    assert created, f"user {name} exists"
    return Credentials(name, password)
