"""API keys: records holding only hashes of secrets, the stores that keep them, and the authenticator that turns a
request's bearer secret into the Caller (tenant, roles, limits) it speaks for."""

from interpgw.auth.authenticator import LOCAL_CALLER, Authenticator, Caller
from interpgw.auth.keys import ROLES, ApiKey, KeyLimits, check_roles, check_tenant, hash_secret, new_api_key
from interpgw.auth.keystore import (
    FileKeyStore,
    KeyStore,
    MemoryKeyStore,
    RedisKeyStore,
    open_key_store,
    read_key_file,
    write_key_file,
)

__all__ = [
    "LOCAL_CALLER",
    "ROLES",
    "ApiKey",
    "Authenticator",
    "Caller",
    "FileKeyStore",
    "KeyLimits",
    "KeyStore",
    "MemoryKeyStore",
    "RedisKeyStore",
    "check_roles",
    "check_tenant",
    "hash_secret",
    "new_api_key",
    "open_key_store",
    "read_key_file",
    "write_key_file",
]
