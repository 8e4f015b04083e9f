"""API keys: made at random, stored as SHA-256, looked up by hash."""

import hashlib
import secrets

KEY_PREFIX = "sk-ferry-"


def new_key() -> str:
    """A new secret key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()
