"""Credentials for authenticated Kafka brokers (SASL/TLS), and the redaction that keeps them secret.

Rubin's alert brokers need SASL (SCRAM) over TLS. The settings come from the environment
(``AMPEL_DASK_KAFKA_SASL_PASSWORD``, ...) or a secrets file (YAML, JSON or ``.env``), never from the
workflow file (which is hashed into manifests and shared). The secret values are handed to librdkafka
and nowhere else: every line this package logs or raises about Kafka goes through a :class:`Redactor`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

ENV_PREFIX = "AMPEL_DASK_KAFKA_"
MASK = "***"
# librdkafka properties whose values are secrets: never accepted on the command line (-X), always masked
SECRET_PROPERTIES = {
    "sasl.password", "ssl.key.password", "ssl.keystore.password", "ssl.key.pem", "ssl_key",
    "sasl.oauthbearer.client.secret", "sasl.oauthbearer.config", "sasl.oauthbearer.assertion.private.key.passphrase",
}  # fmt: skip


class CredentialsError(ValueError):
    """Unusable credential settings; the message names keys, never values."""


class KafkaCredentials(BaseModel):
    """SASL/TLS settings of an authenticated broker (and of its schema registry)."""

    model_config = ConfigDict(extra="forbid")

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = None
    sasl_mechanism: str | None = None  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER, GSSAPI
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    ssl_endpoint_identification_algorithm: str | None = None
    schema_registry_username: str | None = None
    schema_registry_password: SecretStr | None = None

    @classmethod
    def load(cls, secrets_file: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> KafkaCredentials:
        """The secrets file's settings, overridden by ``AMPEL_DASK_KAFKA_*`` environment variables."""
        values: dict[str, str] = {}
        if secrets_file:
            values.update(_read_secrets_file(Path(secrets_file)))
        env = os.environ if env is None else env
        values.update({_norm(k): v for k, v in env.items() if k.startswith(ENV_PREFIX) and v != ""})
        values.pop("bootstrap", None)  # AMPEL_DASK_KAFKA_BOOTSTRAP is read by the CLI, not a credential
        try:
            return cls.model_validate(values)
        except ValidationError as exc:  # pydantic's message would echo the values: keep names only
            where = ", ".join(sorted({str(e["loc"][0]) if e["loc"] else "?" for e in exc.errors()}))
            raise CredentialsError(f"invalid Kafka credential settings: {where} (see AMPEL_DASK_KAFKA_* / --secrets)") from None

    def librdkafka(self) -> dict[str, str]:
        """The librdkafka properties, secrets in clear: for the client's constructor only."""
        out = {}
        for name, value in self:
            if value is None or name.startswith("schema_registry"):
                continue
            out[name.replace("_", ".")] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        return out

    def secrets(self) -> list[str]:
        """Every secret value (what a :class:`Redactor` masks)."""
        return [v.get_secret_value() for _, v in self if isinstance(v, SecretStr) and v.get_secret_value()]

    def describe(self) -> str:
        """What is configured, safe to log: protocol, mechanism and user, never a password."""
        if not self.security_protocol and not self.sasl_username:
            return "no credentials (PLAINTEXT)"
        parts = [self.security_protocol or "PLAINTEXT"]
        if self.sasl_mechanism:
            parts.append(self.sasl_mechanism)
        if self.sasl_username:
            parts.append(f"user {self.sasl_username}")
        return " ".join(parts)


def _norm(key: str) -> str:
    """AMPEL_DASK_KAFKA_SASL_PASSWORD, sasl.password, sasl-password -> sasl_password."""
    k = key.strip()
    if k.upper().startswith(ENV_PREFIX):
        k = k[len(ENV_PREFIX):]
    return re.sub(r"[.\-]", "_", k.lower())


def _read_secrets_file(path: Path) -> dict[str, str]:
    """A mapping from YAML/JSON (optionally under a ``kafka:`` key) or ``KEY=VALUE`` lines (.env)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read secrets file {path}: {exc.strerror}") from None
    data: object
    if path.suffix in (".json",):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise CredentialsError(f"secrets file {path} is not valid JSON") from None
    elif path.suffix in (".yml", ".yaml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            raise CredentialsError(f"secrets file {path} is not valid YAML") from None
    else:
        data = _dotenv(text)
    if isinstance(data, dict) and isinstance(data.get("kafka"), dict):
        data = data["kafka"]
    if not isinstance(data, dict):
        raise CredentialsError(f"secrets file {path} does not hold a mapping of settings")
    return {_norm(str(k)): str(v) for k, v in data.items() if v is not None}


def _dotenv(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


class Redactor:
    """Masks secret values (and passwords in URLs) in any text that may be shown or stored."""

    _URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:\s]+):(?P<pw>[^/@\s]+)@")

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: object) -> str:
        out = str(text)
        for s in self.secrets:
            out = out.replace(s, MASK)
        return self._URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", out)

    def filter(self) -> logging.Filter:
        """A logging filter (put it on a handler) that redacts each record's final message."""
        return _RedactFilter(self)


class _RedactFilter(logging.Filter):
    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = self.redactor(msg), ()
        if record.exc_text:
            record.exc_text = self.redactor(record.exc_text)
        return True


def check_properties(props: Mapping[str, str]) -> None:
    """Extra librdkafka properties (``-X key=value``) must not carry secrets (they would show in
    ``ps`` and shell history) nor switch on auto-commit (which breaks exactly-once results)."""
    bad = sorted(k for k in props if k in SECRET_PROPERTIES or "password" in k or "secret" in k)
    if bad:
        raise CredentialsError(f"{', '.join(bad)}: put secrets in the environment ({ENV_PREFIX}*) or a --secrets file, not on the command line")
    if str(props.get("enable.auto.commit", "false")).lower() in ("true", "1"):
        raise CredentialsError("enable.auto.commit must stay false: live mode commits offsets after results are durable")
