"""Tenants: API keys, who a request belongs to, and what a key may do (stored by
:class:`breakwater.broker.api_keys.KeyStore`)."""

from breakwater.tenancy.apikeys import ANONYMOUS, ApiKey, Principal, generate_key, key_digest

__all__ = ["ANONYMOUS", "ApiKey", "Principal", "generate_key", "key_digest"]
