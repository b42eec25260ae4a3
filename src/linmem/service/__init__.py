"""linmem as a service: an HTTP API (`linmem serve`) and an MCP server (`linmem mcp`) over one core."""

from .core import Conflict, NoSuchItem, Service

__all__ = ["Conflict", "NoSuchItem", "Service"]
