"""Bearer tokens, each optionally limited to some models, held only as SHA-256 digests.

The text form (a tokens file, or an environment variable) has one token a line, optionally
followed by a comma-separated list of the models it may use; `#` starts a comment:

    3f9c...e1   smollm2,llama        # these two models only
    8d21...7a                        # every model

Several tokens may be valid at once, so a new one can be rolled out before the old one goes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

MIN_TOKEN_LENGTH = 16


class TokenError(ValueError):
    """A tokens text that cannot be used; the message names the line."""


@dataclass(frozen=True)
class TokenGrant:
    """What a token lets in: None is every model."""

    models: frozenset[str] | None


class TokenStore:
    def __init__(self, grants: dict[bytes, TokenGrant]):
        self._grants = grants

    def __len__(self) -> int:
        return len(self._grants)

    @classmethod
    def parse(cls, text: str, where: str) -> TokenStore:
        grants: dict[bytes, TokenGrant] = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) > 2:
                raise TokenError(f"{where} line {number}: expected a token and at most one list of models")
            token = fields[0]
            if len(token) < MIN_TOKEN_LENGTH:
                raise TokenError(f"{where} line {number}: tokens need at least {MIN_TOKEN_LENGTH} characters")
            models = frozenset(fields[1].split(",")) - {""} if len(fields) == 2 else None
            grants[_digest(token)] = TokenGrant(models)
        if not grants:
            raise TokenError(f"{where}: holds no token")
        return cls(grants)

    def merged(self, other: TokenStore) -> TokenStore:
        return TokenStore({**self._grants, **other._grants})

    def grant_for(self, token: str) -> TokenGrant | None:
        """The grant of a token a client sent, or None for an unknown one."""
        return self._grants.get(_digest(token))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
