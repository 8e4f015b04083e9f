"""Identifiers that look like OpenAI's."""

import secrets


def new_id(prefix: str) -> str:
    """A random id such as `chatcmpl-3Jx...` (24 url-safe characters after the prefix)."""
    return f"{prefix}-{secrets.token_urlsafe(18)}"
