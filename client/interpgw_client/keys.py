"""API keys as the SDK shows them (`client.keys`): an admin manages the keys of their own tenant."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from interpgw.v1 import gateway_pb2 as pb

LIMIT_FIELDS = ("requests_per_s", "burst", "max_concurrent", "capture_bytes_per_min", "max_tokens")


@dataclass
class ApiKeyInfo:
    """A key's public facts: never its secret."""

    id: str
    tenant: str
    roles: list[str]
    name: str = ""
    created: float | None = None  # unix seconds
    limits: dict[str, float] = field(default_factory=dict)  # only the key's own limits; others: server defaults

    @classmethod
    def from_proto(cls, msg: pb.ApiKeyInfo) -> ApiKeyInfo:
        return cls(
            id=msg.id,
            tenant=msg.tenant,
            roles=list(msg.roles),
            name=msg.name,
            created=msg.created.ToNanoseconds() / 1e9 if msg.HasField("created") else None,
            limits={f: getattr(msg.limits, f) for f in LIMIT_FIELDS if msg.limits.HasField(f)},
        )


def build_create_key(roles: Sequence[str] | str, name: str = "", **limits: float | None) -> pb.CreateApiKeyRequest:
    """`roles`: "read", "steer", "admin" (a list or "read,steer"); `limits`: any of LIMIT_FIELDS."""
    unknown = sorted(set(limits) - set(LIMIT_FIELDS))
    if unknown:
        raise TypeError(f"unknown key limits {unknown}; valid: {', '.join(LIMIT_FIELDS)}")
    if isinstance(roles, str):
        roles = [r.strip() for r in roles.split(",") if r.strip()]
    request = pb.CreateApiKeyRequest(roles=list(roles), name=name)
    given = {k: v for k, v in limits.items() if v is not None}
    if given:
        request.limits.CopyFrom(pb.KeyLimits(**given))
    return request
