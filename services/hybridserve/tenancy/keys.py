"""API keys: their format, generation, parsing and digests. Pure functions.

A key looks like ``hst_k3x9q2m7w4p1_<43 characters>``:

- ``hst_`` (a tenant key) or ``hsa_`` (an admin key): the kind, visible, so a
  leaked key is easy to recognise (and to scan for);
- a 12-character key id (lowercase base32): public, the store's lookup key, and
  what logs, audit entries and the CLI show;
- 32 random bytes from `secrets`, base64url (256 bits of entropy).

Only ``sha256("hybridserve-api-key-v1\\0" + key)`` is stored. With 256 random bits a
digest cannot be reversed and there is no dictionary to try, so a plain
cryptographic hash is enough: slow password hashes (bcrypt, argon2) exist to
protect low-entropy human passwords, and would cost tens of milliseconds on every
request here for no gain. Lookup is by key id, then the digests are compared in
constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal

KeyKind = Literal["admin", "tenant"]

_PREFIX = {"admin": "hsa", "tenant": "hst"}
_KIND = {v: k for k, v in _PREFIX.items()}
_KEY_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
KEY_ID_CHARS = 12
SECRET_BYTES = 32
#: Length of every valid key; anything longer is refused before any parsing.
KEY_CHARS = 3 + 1 + KEY_ID_CHARS + 1 + 43
_KEY_RE = re.compile(r"^(hs[at])_([a-z2-7]{12})_([A-Za-z0-9_-]{43})$")
_DOMAIN = b"hybridserve-api-key-v1\0"


@dataclass(frozen=True)
class ParsedKey:
    kind: KeyKind
    key_id: str
    key: str  # the whole key: what the digest is taken of

    @property
    def digest(self) -> str:
        return digest(self.key)


class MalformedKey(ValueError):
    """The text is not a hybridserve API key (its shape, not whether it is valid)."""


def new_key_id() -> str:
    return "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_CHARS))


def generate(kind: KeyKind, key_id: str | None = None) -> ParsedKey:
    """A new random key of `kind`."""
    key_id = key_id or new_key_id()
    secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).decode().rstrip("=")
    return parse(f"{_PREFIX[kind]}_{key_id}_{secret}")


def parse(text: str) -> ParsedKey:
    """Splits a key into kind and key id; MalformedKey when it has the wrong shape.

    Cheap on any input: the length is checked before the pattern runs.
    """
    if not isinstance(text, str) or len(text) != KEY_CHARS:
        raise MalformedKey("not a hybridserve API key (wrong length)")
    m = _KEY_RE.match(text)
    if m is None:
        raise MalformedKey("not a hybridserve API key (expected hst_<id>_<secret> or hsa_<id>_<secret>)")
    return ParsedKey(_KIND[m.group(1)], m.group(2), text)


def digest(key: str) -> str:
    """The stored form of a key: hex SHA-256, domain-separated."""
    return hashlib.sha256(_DOMAIN + key.encode()).hexdigest()


def matches(key: ParsedKey, stored_digest: str) -> bool:
    """Whether `key` is the one whose digest is stored, in constant time."""
    return hmac.compare_digest(key.digest.encode(), stored_digest.encode())


def display_prefix(kind: KeyKind, key_id: str) -> str:
    """What the CLI and the API show of a key: its kind and id."""
    return f"{_PREFIX[kind]}_{key_id}"
