"""Object storage: an S3 client for ``s3://bucket/key`` URIs and the embedded SeaweedFS server."""

from dinoflow.storage.client import ObjectStore, join_uri, parse_uri
from dinoflow.storage.resolve import configured_settings, open_store, resolve_settings

__all__ = ["ObjectStore", "configured_settings", "join_uri", "open_store", "parse_uri", "resolve_settings"]
