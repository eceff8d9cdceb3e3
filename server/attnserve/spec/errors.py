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
        super().__init__(f"model {name!r} is not served")


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
