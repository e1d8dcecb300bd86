"""API keys in Redis (records of :mod:`breakwater.tenancy`): create, look up, list, revoke, rotate."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis

from breakwater.broker.cluster import Fast
from breakwater.broker.scripts import Script
from breakwater.broker.wire import text
from breakwater.keys import Keys
from breakwater.tenancy.apikeys import ApiKey, generate_key, generate_key_id, key_digest


class RotatedAlready(Exception):
    """A key rotated once is rotated no more: its successor is the one to rotate."""

    def __init__(self, key_id: str, successor: str) -> None:
        to = successor or "a key being made"
        super().__init__(f"{key_id} was rotated already (to {to}); rotate that one")
        self.key_id = key_id
        self.successor = successor


class KeyStore:
    def __init__(self, redis: Redis, keys: Keys, pepper: bytes, fast: Fast) -> None:
        self.redis = redis
        self.keys = keys
        self.pepper = pepper
        self._rotate = Script(fast, "key_rotate")

    async def create(self, template: ApiKey) -> tuple[str, ApiKey]:
        """A new key with ``template``'s settings (its id and times are made here): (secret, record)."""
        secret = generate_key()
        record = replace(template, id=generate_key_id(), created=int(time.time()), revoked=0, successor="")
        digest = self.digest(secret)
        # The record first, then the index: a key never listed is harmless, a listed one without a
        # record would not be.
        mapping: dict[Any, Any] = dict(record.to_hash())
        await self.redis.hset(self.keys.api_key(digest), mapping=mapping)
        await self.redis.hset(self.keys.api_key_ids(), record.id, digest)
        return secret, record

    def digest(self, secret: str) -> str:
        return key_digest(secret, self.pepper)

    async def lookup(self, secret: str) -> ApiKey | None:
        return await self.lookup_digest(self.digest(secret))

    async def lookup_digest(self, digest: str) -> ApiKey | None:
        raw: Any = await self.redis.hgetall(self.keys.api_key(digest))
        return ApiKey.from_hash(_text(raw)) if raw else None

    async def get(self, key_id: str) -> ApiKey | None:
        digest = await self._digest(key_id)
        if digest is None:
            return None
        raw: Any = await self.redis.hgetall(self.keys.api_key(digest))
        return ApiKey.from_hash(_text(raw)) if raw else None

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        index: Any = await self.redis.hgetall(self.keys.api_key_ids())
        found = []
        for key_id in sorted(_text(index)):
            record = await self.get(key_id)
            if record is not None and (tenant is None or record.tenant == tenant):
                found.append(record)
        return found

    async def revoke(self, key_id: str, *, at: int | None = None) -> ApiKey | None:
        """Revoke now (or expire at ``at``); every gateway refuses it within its cache time. It also
        forgets the key's successor (a rotation's): work the key started (a batch) stops with it
        instead of going on as the key that replaced it."""
        digest = await self._digest(key_id)
        if digest is None or not await self.redis.exists(self.keys.api_key(digest)):
            return None
        await self.redis.hdel(self.keys.api_key(digest), "successor")
        if at is None:
            # Its first revocation stands (a record of when it was stopped): revoking again changes nothing.
            current = await self.get(key_id)
            if current is not None and not current.revoked:
                await self.redis.hset(self.keys.api_key(digest), "revoked", str(int(time.time())))
        else:
            current = await self.get(key_id)
            if current is not None and current.expires and current.expires < at:
                at = current.expires  # a grace period never extends a key's life
            await self.redis.hset(self.keys.api_key(digest), "expires", str(at))
        return await self.get(key_id)

    async def rotate(
        self, key_id: str, grace_s: int = 0, expires: int | None = None
    ) -> tuple[str, ApiKey] | None:
        """A new key with the same tenant and limits (and expiry, unless ``expires`` gives its own:
        unix seconds, 0 never); the old one is revoked (after ``grace_s``) and
        names the new one as its successor, so work it started (a batch) goes on as the new key.
        None when the key is not live; :class:`RotatedAlready` when it was rotated (or is being
        rotated) already: of two rotations at once, one makes a key and the other none."""
        old = await self.get(key_id)
        digest = await self._digest(key_id)
        if old is None or digest is None or old.usable(time.time()) is not None:
            return None
        if old.successor:
            raise RotatedAlready(key_id, old.successor)
        # Its limits, budgets and usage go on where the old key's are (its lineage), not afresh.
        new = replace(old, lineage=old.limit_id, expires=old.expires if expires is None else expires)
        secret, created = await self.create(new)
        now = int(time.time())
        end = now + grace_s if grace_s > 0 else 0
        # One call claims the key (once), names its successor and ends it: no state between.
        before = text(await self._rotate(keys=[self.keys.api_key(digest)], args=[created.id, now, end]))
        if before:
            await self._forget(created.id, self.digest(secret))
            if before == "?":  # removed meanwhile
                return None
            raise RotatedAlready(key_id, before)
        return secret, created

    async def _forget(self, key_id: str, digest: str) -> None:
        """Remove a key no one was given: the index first, then its record (as ``create``, reversed)."""
        await self.redis.hdel(self.keys.api_key_ids(), key_id)
        await self.redis.delete(self.keys.api_key(digest))

    async def _digest(self, key_id: str) -> str | None:
        digest: Any = await self.redis.hget(self.keys.api_key_ids(), key_id)
        return text(digest) if digest is not None else None


def _text(raw: dict[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}
