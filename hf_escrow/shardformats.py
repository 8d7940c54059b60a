"""The shard file formats a paid dataset is served in, as the seller lists them and the
buyer's `datasets` loader reads them: one table, so that both sides agree.
"""

from __future__ import annotations

from pathlib import Path

# extension -> the `datasets` packaged builder that reads it
SHARD_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
MEDIA_TYPES = {"parquet": "application/vnd.apache.parquet", "arrow": "application/vnd.apache.arrow.file",
               "json": "application/x-ndjson", "csv": "text/csv"}


def shard_format(path: str | Path) -> str | None:
    """The `datasets` builder for a shard file name (parquet, json, csv, arrow), or None."""
    return SHARD_FORMATS.get(Path(str(path)).suffix.lower())
