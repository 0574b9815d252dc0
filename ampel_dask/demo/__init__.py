"""The embedded default job: a simulated ZTF-like stream, ingested and run through an example workflow."""
