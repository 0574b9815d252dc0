"""Regenerate ampel_dask/io/schemas from a checkout of lsst/alert_packet's schema folder.

Each `<major>/<minor>/lsst.vM_m.alert.avsc` (with its sibling record files) is resolved into one
self-contained JSON in Avro's parsing canonical form, so that the package can decode Confluent-framed
Rubin messages without the upstream tree at run time.

    python scripts/vendor_lsst_schemas.py path/to/alert_packet/python/lsst/alert/packet/schema
"""

from __future__ import annotations

import sys
from pathlib import Path

import fastavro.schema

OUT = Path(__file__).resolve().parents[1] / "ampel_dask" / "io" / "schemas"


def main(src: str) -> None:
    for alert in sorted(Path(src).glob("*/*/lsst.v*_*.alert.avsc")):
        schema = fastavro.schema.load_schema(str(alert))
        target = OUT / alert.name.replace(".avsc", ".json")
        target.write_text(fastavro.schema.to_parsing_canonical_form(schema) + "\n")
        print(f"{alert} -> {target.relative_to(OUT.parents[2])}")


if __name__ == "__main__":
    main(sys.argv[1])
