"""The escrow engine: accounts, escrows, a double-entry journal, on SQLite or PostgreSQL.

This package never imports ML libraries; adapters reach it only through a client.
"""

from .audit import audit
from .config import LedgerConfig
from .core import Ledger

__all__ = ["Ledger", "LedgerConfig", "audit"]
