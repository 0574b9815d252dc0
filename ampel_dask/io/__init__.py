"""Reading alerts: Avro framing, survey normalisers, the Parquet archive, ingest."""
