"""Python client of attnserve: sync (Client) and asyncio (AsyncClient), no torch needed."""

from attnserve_client.aio import AsyncClient
from attnserve_client.client import Client
from attnserve_client.completion import Completion, Usage
from attnserve_client.errors import AttnserveError, FieldViolation
from attnserve_client.spec import SpecError

__all__ = ["AsyncClient", "AttnserveError", "Client", "Completion", "FieldViolation", "SpecError", "Usage"]
