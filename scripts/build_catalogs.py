"""Build the veto catalogs of workflows/sn_ia_sample.yml from the shared Parquet files (GCVS, SPICY).

    python scripts/build_catalogs.py ../shared/data/catalogs --out catalogs

Each becomes a HEALPix-indexed catalog (``ampel_dask.tiers.catalog.build_catalog``) with ``ra``/``dec`` in
degrees and its type column with the fixed-width padding trimmed: ``catalogs/gcvs.parquet`` (GCVS
variable stars, ``VarType``) and ``catalogs/spicy.parquet`` (SPICY young stellar objects, ``class``).
The built files are data, not code: keep them out of the repository.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ampel_dask.tiers.catalog import build_catalog, content_hash

# name -> (source file, its ra column, its dec column, its type column)
CATALOGS = {"gcvs": ("gcvs.parquet", "ra", "dec", "VarType"), "spicy": ("spicy.parquet", "RAdeg", "DEdeg", "class")}


def build(source_dir: Path, out_dir: Path, order: int = 10) -> dict[str, Path]:
    """Build every catalog found in ``source_dir`` into ``out_dir``; returns name -> path."""
    out = {}
    for name, (fname, ra, dec, kind) in CATALOGS.items():
        src = source_dir / fname
        if not src.is_file():
            raise FileNotFoundError(f"{src} does not exist")
        t = pq.read_table(src, columns=[ra, dec, kind])
        table = pa.table({"ra": t.column(ra), "dec": t.column(dec), kind: pc.utf8_trim_whitespace(t.column(kind))})
        out[name] = build_catalog(table, out_dir / f"{name}.parquet", order=order)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source_dir", type=Path, help="folder with gcvs.parquet and spicy.parquet")
    ap.add_argument("--out", type=Path, default=Path("catalogs"), help="output folder (default: catalogs)")
    ap.add_argument("--order", type=int, default=10, help="HEALPix order of the index (default 10, ~3.4' cells)")
    args = ap.parse_args(argv)
    try:
        built = build(args.source_dir, args.out, args.order)
    except (FileNotFoundError, KeyError) as exc:
        print(f"build_catalogs: {exc}", file=sys.stderr)
        return 2
    for name, path in built.items():
        print(f"{name}: {path} ({pq.ParquetFile(path).metadata.num_rows} rows, content hash {content_hash(path)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
