"""Sealing small secrets kept in session data (AES-256-GCM, pycryptodome).

A provider that must keep a secret in the gateway session (an identity
provider's session key, say) seals it first, so that a dump of the session store
does not reveal it.  The key is ``[sessions] encryption_key``: base64 of 32
random bytes (``python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"``).

A sealed value is text: ``v1.`` + base64url(12-byte nonce | ciphertext |
16-byte tag).  ``context`` is bound in as associated data, so a sealed value
cannot be moved to another purpose (or another session) undetected.
"""

from __future__ import annotations

import base64
import binascii
import os

from Crypto.Cipher import AES

KEY_BYTES = 32
_NONCE = 12
_TAG = 16
_VERSION = "v1."


def parse_key(value: str) -> bytes:
    """The 32-byte key from its base64 text; ``ValueError`` saying what is wrong."""
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("expected base64 text of 32 random bytes") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"expected base64 of 32 bytes, got {len(key)} bytes")
    return key


class Sealer:
    """Seals and opens small byte strings under one AES-256-GCM key."""

    def __init__(self, key: bytes, *, ephemeral: bool = False) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("the sealing key must be 32 bytes")
        self._key = key
        #: True when the key was generated for this process only
        self.ephemeral = ephemeral

    @classmethod
    def generate(cls) -> "Sealer":
        return cls(os.urandom(KEY_BYTES), ephemeral=True)

    def seal(self, data: bytes, context: str = "") -> str:
        nonce = os.urandom(_NONCE)
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=nonce, mac_len=_TAG)
        cipher.update(context.encode())
        ciphertext, tag = cipher.encrypt_and_digest(data)
        return _VERSION + base64.urlsafe_b64encode(nonce + ciphertext + tag).decode("ascii")

    def open(self, sealed: str, context: str = "") -> bytes:
        """The sealed bytes; ``ValueError`` if the value was not sealed by
        this key for this context (or was altered)."""
        if not isinstance(sealed, str) or not sealed.startswith(_VERSION):
            raise ValueError("not a sealed value")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(_VERSION):].encode("ascii"))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise ValueError("not a sealed value") from None
        if len(raw) < _NONCE + _TAG:
            raise ValueError("not a sealed value")
        nonce, ciphertext, tag = raw[:_NONCE], raw[_NONCE:-_TAG], raw[-_TAG:]
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=nonce, mac_len=_TAG)
        cipher.update(context.encode())
        try:
            return cipher.decrypt_and_verify(ciphertext, tag)
        except ValueError:
            raise ValueError("the sealed value does not open under this key") from None
