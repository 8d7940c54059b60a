"""The escrow server: REST (both seed dialects), faucet, MCP; `hf-escrow serve`."""

from .app import create_app

__all__ = ["create_app"]
