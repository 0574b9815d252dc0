"""Writer schemas from a Confluent schema registry, cached as files the decoder already understands.

A Rubin message names its writer schema by a registry id. The decoder (``avro.SchemaCache``) finds
wire schemas in folders, by the file name ``lsst.v<id // 100>_<id % 100>.alert.json``; so a schema
fetched from the registry (``GET <url>/schemas/ids/<id>``) is written there under that name, once, before
the batch is decoded. Decoding on the workers then needs no network access, and a registry that is
down fails the batch before anything is committed (it is read again later) instead of quarantining it.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from .files import atomic_write
from .kafka_auth import Redactor

log = logging.getLogger("ampel_dask.kafka")


class RegistryError(RuntimeError):
    """The registry could not be asked (message redacted)."""


def schema_file(folder: Path, schema_id: int) -> Path:
    major, minor = divmod(schema_id, 100)
    return folder / f"lsst.v{major}_{minor}.alert.json"


class SchemaRegistry:
    def __init__(self, url: str, folder: str | Path, username: str | None = None, password: str | None = None,
                 redactor: Redactor | None = None, timeout: float = 10.0):  # fmt: skip
        self.url = url.rstrip("/")
        self.folder = Path(folder)
        self.timeout = timeout
        self.redactor = redactor or Redactor([password] if password else [])
        self._auth = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode() if username else None
        self.missing: set[int] = set()  # ids the registry does not know (their messages go to quarantine)

    def ensure(self, schema_ids: Iterable[int]) -> list[int]:
        """Fetch the schemas of these ids not cached yet; returns the ids fetched now."""
        fetched = []
        for sid in sorted(set(schema_ids)):
            path = schema_file(self.folder, sid)
            if path.exists() or sid in self.missing:
                continue
            schema = self._get(sid)
            if schema is None:
                self.missing.add(sid)
                log.warning("schema registry %s has no schema id %d; its messages go to quarantine", self.redactor(self.url), sid)
                continue
            atomic_write(path, (json.dumps(schema, sort_keys=True) + "\n").encode())
            fetched.append(sid)
        return fetched

    def _get(self, sid: int) -> dict | None:
        req = urllib.request.Request(f"{self.url}/schemas/ids/{sid}", headers={"Accept": "application/vnd.schemaregistry.v1+json, application/json"})
        if self._auth:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise RegistryError(f"schema registry {self.redactor(self.url)}: HTTP {exc.code} for schema id {sid}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RegistryError(f"schema registry {self.redactor(self.url)} unreachable: {self.redactor(exc)}") from None
        schema = body.get("schema") if isinstance(body, dict) else None
        if not isinstance(schema, str):
            raise RegistryError(f"schema registry {self.redactor(self.url)}: no schema in the answer for id {sid}")
        return json.loads(schema)
