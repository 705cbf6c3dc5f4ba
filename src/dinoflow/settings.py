"""Object-store settings, read from the environment (``DINOFLOW_S3_*``).

Credentials never have code defaults: a deployment passes them from a Kubernetes Secret as env
vars; the embedded store (``dinoflow store up``) writes them to its state file, which is read only
when no endpoint is configured (``dinoflow.storage.resolve``).
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class S3Settings(BaseSettings):
    """Where the object store is and how to authenticate."""

    model_config = SettingsConfigDict(env_prefix="DINOFLOW_S3_", extra="ignore")

    endpoint: str | None = Field(None, description="host:port or http(s)://host:port of the S3 API")
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    region: str | None = None
    secure: bool | None = Field(None, description="TLS; inferred from an https:// endpoint when unset")
    max_retries: int = Field(5, ge=0, description="retries on transient errors, exponential backoff")
    retry_base_seconds: float = Field(0.2, gt=0)
    timeout_seconds: float = Field(30.0, gt=0, description="connect/read timeout per request")
    tmp_max_age_seconds: float = Field(
        3600.0, ge=0, description="a temporary `_tmp/` key older than this is a killed write's: removed"
    )

    def host_and_tls(self) -> tuple[str, bool]:
        ep = self.endpoint or ""
        secure = self.secure
        if ep.startswith("https://"):
            ep, secure = ep[len("https://") :], True if secure is None else secure
        elif ep.startswith("http://"):
            ep, secure = ep[len("http://") :], False if secure is None else secure
        return ep.rstrip("/"), bool(secure)
