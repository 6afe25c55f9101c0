"""API-key management over the API: an admin manages the keys of their own tenant.

Keys are created with at most the creating key's roles (an admin cannot mint a key that can do more than itself),
always in the caller's tenant; other tenants' keys are invisible (revoking one answers NOT_FOUND). Operators manage
every tenant's keys with the `interpgw keys` command instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from interpgw.access import current_caller
from interpgw.auth.keys import ApiKey, KeyLimits, check_roles, new_api_key
from interpgw.auth.keystore import KeyStore
from interpgw.core.errors import FailedPrecondition, NotFound, PermissionDenied
from interpgw.steering.operations import check_label


class KeyManagement:
    def __init__(self, store: KeyStore | None) -> None:
        self.store = store  # None: authentication is off

    def _writable_store(self) -> KeyStore:
        if self.store is None:
            raise FailedPrecondition("authentication is off on this gateway: there are no API keys to manage")
        if not self.store.writable:
            raise FailedPrecondition(
                f"this gateway's keys come from {self.store.describe()}, which it cannot change: "
                "edit it with `interpgw keys`, or serve with --api-keys-in-redis"
            )
        return self.store

    async def create(self, roles: Iterable[str], name: str = "", limits: KeyLimits | None = None) -> tuple[str, ApiKey]:
        store = self._writable_store()
        caller = current_caller()
        wanted = check_roles(roles)
        beyond = sorted(wanted - caller.roles)
        if beyond:
            raise PermissionDenied(
                f"a key can only grant roles its creator has; this key lacks {', '.join(beyond)} "
                f"(it has {', '.join(sorted(caller.roles))})"
            )
        secret, key = new_api_key(caller.tenant, wanted, check_label(name, "name"), limits)
        await store.add(key)
        return secret, key

    async def list(self) -> list[ApiKey]:
        return await self._writable_store().list(current_caller().tenant)

    async def revoke(self, key_id: str) -> bool:
        store = self._writable_store()
        tenant = current_caller().tenant
        if not any(k.id == key_id for k in await store.list(tenant)):
            raise NotFound(f"no API key {key_id!r} in tenant {tenant!r}")
        return await store.revoke(key_id)
