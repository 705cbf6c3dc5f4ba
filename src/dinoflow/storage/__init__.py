"""Object storage: an S3 client for ``s3://bucket/key`` URIs and the embedded SeaweedFS server."""

from dinoflow.storage.client import ObjectStore, join_uri, parse_uri

__all__ = ["ObjectStore", "join_uri", "parse_uri"]
