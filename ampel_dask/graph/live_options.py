"""How a live stream is consumed: declared once here, for the API and the ``live`` command's options
(a light module: the command line reads it without importing Kafka or Dask)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LiveOptions(BaseModel):
    """How a live stream is consumed; credentials are not here (environment or secrets file only)."""

    model_config = ConfigDict(extra="forbid")

    bootstrap: str = Field(..., description="Kafka bootstrap servers host:port[,...] (or AMPEL_DASK_KAFKA_BOOTSTRAP)")
    topics: list[str] = Field(..., min_length=1, description="topic to consume (repeatable)")
    group: str | None = Field(None, description="consumer group (default ampel-dask-<workflow name>)")
    interval: float = Field(60.0, gt=0, description="seconds per micro-batch")
    max_batch: int = Field(10_000, ge=1, description="close a batch as soon as this many messages wait")
    batches: int | None = Field(None, ge=1, description="stop after N batches (empty ones count)")
    until_idle: bool = Field(False, description="stop after the first empty batch (drain the topic)")
    archive: str | None = Field(None, description="archive folder (overrides archive.path)")
    store: str | None = Field(None, description="result store folder (overrides store.path)")
    workers: int | None = Field(None, ge=0, description="local worker processes (default: all cores; 0 = threads in this process)")
    cluster: Literal["local", "slurm", "address"] | None = Field(None, description="override cluster.kind")
    jobs: int | None = Field(None, ge=1, description="SLURM worker jobs (with --cluster slurm)")
    schema_dirs: list[str] = Field(default_factory=list, description="extra Rubin schema folder (wire format)")
    schema_registry: str | None = Field(None, description="Confluent schema registry URL for wire-format schemas")
    secrets_file: str | None = Field(None, description="YAML/JSON/.env with SASL/TLS settings (else AMPEL_DASK_KAFKA_* variables)")
    properties: dict[str, str] = Field(default_factory=dict, description="extra librdkafka setting KEY=VALUE (no secrets), e.g. session.timeout.ms=10000")
    offset_reset: Literal["earliest", "latest"] = Field("earliest", description="where a new group starts")
    t3_scope: Literal["stream", "batch"] = Field("stream", description="T3 over everything the stream processed so far, or over the batch only")
    metrics_file: str | None = Field(None, description="Prometheus text file, rewritten after every batch")
    metrics_port: int | None = Field(None, ge=0, description="serve Prometheus metrics on this port (/metrics)")
    metrics_host: str = Field("127.0.0.1", description="address for --metrics-port")
    join_timeout: float = Field(60.0, ge=0, description="seconds to wait for the group's first partitions")
    chunk_packets: int = Field(2000, ge=1, description="messages per decode task")
    compact_every: int = Field(10, ge=0, description="every N committed batches, compact the nights they wrote to in the background (0: never)")
    compact_rows: int = Field(25_000, gt=0, description="rows per part that compaction writes")
    history: bool = Field(True, description="add each batch's parts to the archive's object-bucketed history, which history channels read (io/history.py)")
    store_wait: float | None = Field(None, ge=0, description="seconds a batch waits for the store while another run holds it (default: as long as it takes)")
