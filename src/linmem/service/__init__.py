"""linmem as a service: an HTTP API (`linmem serve`) and an MCP server (`linmem mcp`) over one core."""

from .core import Conflict, Service

__all__ = ["Conflict", "Service"]
