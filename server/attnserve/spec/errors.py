"""The error vocabulary of request handling; api/errors.py maps it to gRPC statuses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: its path in the request (proto field names) and why."""

    field: str
    description: str


class RequestError(Exception):
    """A request the server refuses before it reaches a model."""


class InvalidRequest(RequestError):
    """INVALID_ARGUMENT: one or more fields are invalid."""

    def __init__(self, violations: list[FieldViolation]):
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class ModelNotFound(RequestError):
    """NOT_FOUND: no served model has this name."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"model {quoted(name)} is not served")


class Unsupported(RequestError):
    """FAILED_PRECONDITION: valid, but this model or engine cannot do it."""


class Overloaded(RequestError):
    """RESOURCE_EXHAUSTED: too many requests are waiting."""


class Violations:
    """Collects field violations and raises them together."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidRequest(self.items)


def shorten(text: str, max_bytes: int) -> str:
    """text cut to at most max_bytes of UTF-8, "..." marking a cut (error texts must stay small)."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max_bytes - 3].decode(errors="ignore") + "..."


def quoted(value: str, max_bytes: int = 64) -> str:
    """A client's value as error texts quote it: repr of the value, cut to max_bytes."""
    return repr(shorten(value, max_bytes))
