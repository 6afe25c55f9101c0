"""Each tenant's view of the shared registry: its own records plus published ones.

`TenantScopedStore` wraps any `VectorStore` and applies the current caller's tenant (`interpgw.access`) to every
call, so steering, probes and the resolution of vector ids in interventions get tenancy without knowing about it:
- `put` stamps the record with the caller's tenant as owner;
- `get`/`list` see the caller's records, published records and records created with authentication off (owner "");
- `delete` removes only the caller's own records: another tenant's record answers as if absent (NOT_FOUND upstream,
  so ids of private records are not confirmed to exist), a published record of another tenant is PERMISSION_DENIED.
With authentication off every call is the local tenant "", which sees and owns everything it created.
"""

from __future__ import annotations

import builtins

from interpgw.access import current_caller
from interpgw.core.errors import PermissionDenied
from interpgw.registry.records import VectorRecord
from interpgw.registry.store import VectorStore


def visible_to(record_owner: str, public: bool, tenant: str) -> bool:
    """Whether `tenant` may read an entry owned by `record_owner`."""
    return public or record_owner in ("", tenant)


class TenantScopedStore:
    """A `VectorStore` seen as the current caller's tenant."""

    def __init__(self, inner: VectorStore) -> None:
        self.inner = inner

    async def put(self, record: VectorRecord) -> None:
        record.owner = current_caller().tenant  # in place: the caller's reply shows the owner too
        await self.inner.put(record)

    async def get(self, id: str) -> VectorRecord | None:
        record = await self.inner.get(id)
        if record is None or not visible_to(record.owner, record.public, current_caller().tenant):
            return None
        return record

    async def delete(self, id: str) -> bool:
        record = await self.get(id)
        if record is None:
            return False
        if record.owner != current_caller().tenant:
            raise PermissionDenied(f"{id} was published by another tenant; only its owner can delete it")
        return await self.inner.delete(id)

    async def list(self, model: str | None = None) -> builtins.list[VectorRecord]:
        tenant = current_caller().tenant
        return [r for r in await self.inner.list(model) if visible_to(r.owner, r.public, tenant)]

    async def ping(self) -> None:
        await self.inner.ping()

    async def count(self) -> int:
        return await self.inner.count()  # the registry-size metric counts every tenant's records

    async def close(self) -> None:
        await self.inner.close()

    def describe(self) -> str:
        return self.inner.describe()
