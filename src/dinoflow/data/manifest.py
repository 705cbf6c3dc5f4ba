"""Manifests: one Parquet row per image, pointing into tar shards. Stages pass manifests on;
dedup and curation output manifests that point into the same shards, never copying pixels."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from dinoflow.errors import SpecError
from dinoflow.storage.client import ObjectStore

SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # unique id of the image within the dataset
        ("shard", pa.string()),  # s3:// URI of the tar shard
        ("member", pa.string()),  # tar member name of the image inside the shard
        ("source", pa.string()),  # where it came from (dataset / crawl name)
        ("label", pa.int64()),  # class index, -1 when unknown
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),  # content hash of the stored image bytes
        ("split", pa.string()),
    ]
)
COLUMNS = SCHEMA.names


def empty() -> pa.Table:
    return SCHEMA.empty_table()


def from_rows(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def validate(table: pa.Table, where: str = "manifest") -> pa.Table:
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise SpecError(f"{where} lacks column(s) {missing}; a manifest has {COLUMNS}")
    return table


def write_manifest(store: ObjectStore, uri: str, table: pa.Table) -> None:
    validate(table, uri)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put_bytes(uri, buf.getvalue(), "application/vnd.apache.parquet")


def read_manifest(store: ObjectStore, uri: str) -> pa.Table:
    try:
        table = pq.read_table(io.BytesIO(store.get_bytes(uri)))
    except pa.ArrowInvalid as e:
        raise SpecError(f"{uri} is not a Parquet manifest: {e}") from None
    return validate(table, uri)
