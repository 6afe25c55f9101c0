"""API key records: who a key belongs to, what it may do, and the hash that identifies it.

A secret is shown to the operator once, when the key is created; only its sha256 is ever stored, so a leaked key
file or Redis dump lets nobody call the gateway.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from interpgw.core.errors import InvalidArgument

ROLES: tuple[str, ...] = ("read", "steer", "admin")

SECRET_PREFIX = "igw_"
_KEY_ID = re.compile(r"key_[0-9a-f]{12}")
_TENANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_positive(field: str, value: object, kind: type) -> None:
    """A limit must be a positive int (or, for a float limit, any positive finite number); bools are not numbers."""
    allowed = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed) or not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"key limit {field} must be a positive {kind.__name__}, got {value!r}")


def _check_fields(cls: type, data: object, what: str, field_name: str, plural: str) -> None:
    """INVALID_ARGUMENT unless `data` is a mapping of `cls`'s dataclass fields only, naming the valid ones."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"{what} must be a mapping, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid), key=str)
    if unknown:
        raise InvalidArgument(f"unknown {field_name} {unknown[0]!r}: valid {plural} are {', '.join(valid)}")


@dataclass(frozen=True)
class KeyLimits:
    """Per-key overrides of the server's default limits; None = the server default."""

    requests_per_s: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None
    capture_bytes_per_min: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                _check_positive(f.name, value, float if f.name == "requests_per_s" else int)
        if self.requests_per_s is not None:
            object.__setattr__(self, "requests_per_s", float(self.requests_per_s))  # YAML reads `5` as an int

    def to_json(self) -> dict:
        """Only the fields that override a server default."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, data: dict | None) -> KeyLimits:
        if data is None:
            return cls()
        _check_fields(cls, data, "key limits", "key limit", "limits")
        return cls(**data)


@dataclass(frozen=True)
class ApiKey:
    """One API key as stored: everything about it except the secret."""

    id: str  # "key_" + 12 hex chars: public, safe to log and list
    tenant: str  # 1-64 chars of [A-Za-z0-9_.-]
    roles: frozenset[str]  # subset of ROLES, non-empty
    sha256: str  # hex sha256 of the secret
    name: str = ""
    created: float = 0.0  # unix seconds
    limits: KeyLimits = KeyLimits()

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _KEY_ID.fullmatch(self.id):
            raise InvalidArgument(f"invalid key id {self.id!r}: expected 'key_' and 12 lowercase hex characters")
        check_tenant(self.tenant)
        if not isinstance(self.roles, frozenset) or check_roles(self.roles) != self.roles:
            raise InvalidArgument(f"key {self.id}: roles must be a frozenset of {', '.join(ROLES)}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise InvalidArgument(f"key {self.id}: sha256 must be 64 lowercase hex characters")
        if not isinstance(self.name, str):
            raise InvalidArgument(f"key {self.id}: name must be a string")
        if isinstance(self.created, bool) or not isinstance(self.created, int | float):
            raise InvalidArgument(f"key {self.id}: created must be unix seconds, got {self.created!r}")
        if not isinstance(self.limits, KeyLimits):
            raise InvalidArgument(f"key {self.id}: limits must be KeyLimits")

    def to_json(self) -> dict:
        data = {
            "id": self.id,
            "tenant": self.tenant,
            "roles": [r for r in ROLES if r in self.roles],
            "sha256": self.sha256,
            "name": self.name,
            "created": float(self.created),
        }
        limits = self.limits.to_json()
        if limits:
            data["limits"] = limits
        return data

    @classmethod
    def from_json(cls, data: dict) -> ApiKey:
        _check_fields(cls, data, "an API key record", "API key field", "fields")
        missing = [name for name in ("id", "tenant", "roles", "sha256") if name not in data]
        if missing:
            raise InvalidArgument(f"API key record {data.get('id', '')!r} lacks field {missing[0]!r}")
        roles = data["roles"]
        if not isinstance(roles, list):
            raise InvalidArgument(f"key {data['id']!r}: roles must be a list of {', '.join(ROLES)}")
        return cls(
            id=data["id"],
            tenant=data["tenant"],
            roles=check_roles(roles),
            sha256=data["sha256"],
            name=data.get("name", ""),
            created=data.get("created", 0.0),
            limits=KeyLimits.from_json(data.get("limits")),
        )

    def has(self, role: str) -> bool:
        return role in self.roles


def hash_secret(secret: str) -> str:
    """The sha256 hex of a secret.

    A fast hash is right here: secrets are 256 random bits, so there is nothing to brute-force from the hash, and a
    slow password KDF would only add its cost to every request that misses the authenticator's cache.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    """The tenant, if it is 1-64 characters of [A-Za-z0-9_.-] (safe in key names, logs and metric labels)."""
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise InvalidArgument(f"invalid tenant {tenant!r}: use 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'")
    return tenant


def check_roles(roles: Iterable[str]) -> frozenset[str]:
    """The roles as a set, if non-empty and all known; a string is read as a comma-separated list ("read,steer")."""
    items = roles.split(",") if isinstance(roles, str) else list(roles)
    names = [r.strip() if isinstance(r, str) else r for r in items]
    for role in names:
        if role not in ROLES:
            raise InvalidArgument(f"unknown role {role!r}: valid roles are {', '.join(ROLES)}")
    if not names:
        raise InvalidArgument(f"a key needs at least one role: valid roles are {', '.join(ROLES)}")
    return frozenset(names)


def new_api_key(
    tenant: str, roles: Iterable[str], name: str = "", limits: KeyLimits | None = None
) -> tuple[str, ApiKey]:
    """A fresh (secret, record) pair; the caller shows the secret once and stores only the record."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(
        id="key_" + secrets.token_hex(6),
        tenant=check_tenant(tenant),
        roles=check_roles(roles),
        sha256=hash_secret(secret),
        name=name,
        created=time.time(),
        limits=limits if limits is not None else KeyLimits(),
    )
    return secret, record
