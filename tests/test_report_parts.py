"""Parts of the HTML report checked by hand: broker links per survey and id, and the cutout stretch."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest

from ampel_dask.tiers.helpers.report_html import broker_links, sexagesimal, utc
from ampel_dask.tiers.helpers.stamps import grey, stamp_png


def test_broker_links():
    assert broker_links("ZTF18abotjph", "ztf", 123) == [
        ("ALeRCE", "https://alerce.online/object/ZTF18abotjph"),
        ("Fink", "https://fink-portal.org/ZTF18abotjph"),
        ("Lasair", "https://lasair-ztf.lsst.ac.uk/objects/ZTF18abotjph/"),
    ]
    rubin = 169645854020337671  # a diaObjectId of LSSTCam alerts in ../shared/data/lsst/rubin_lsstcam_v10
    assert broker_links(str(rubin), "lsst", rubin) == [
        ("Fink", f"https://lsst.fink-portal.org/{rubin}"),
        ("Lasair", f"https://lasair.lsst.ac.uk/objects/{rubin}/"),
    ]
    assert broker_links("868", "lsst", 868) == []  # an ELAsTiCC (simulated) diaObjectId
    assert broker_links("-21165810000000000", "lsst", -21165810000000000) == []  # a solar-system object
    assert broker_links("ZTF18abotjp", "ztf", 1) == [] and broker_links("ztf18abotjph", "ztf", 1) == []  # not a ZTF name


def test_position_and_time_as_people_write_them():
    assert sexagesimal(0.0, 0.0) == "00:00:00.00 +00:00:00.0"
    assert sexagesimal(187.5, -45.25) == "12:30:00.00 -45:15:00.0"  # 187.5 deg = 12.5 h
    assert sexagesimal(None, 1.0) == "" and utc(float("nan")) == ""
    assert utc(51544.5) == "2000-01-01 12:00"  # J2000.0


def fits_stamp(img: np.ndarray, gz: bool = True) -> bytes:
    from astropy.io import fits

    buf = io.BytesIO()
    fits.PrimaryHDU(img.astype(np.float32)).writeto(buf)
    return gzip.compress(buf.getvalue()) if gz else buf.getvalue()


def test_cutout_stretch_and_orientation():
    img = np.arange(100, dtype=float).reshape(10, 10)  # row 0 (the bottom in FITS) holds 0..9
    lo, hi = 0.99, 98.505  # numpy's linear percentiles 1 and 99.5 of 0..99, by hand: 0.01 * 99, 0.995 * 99
    out = grey(img)
    assert out.dtype == np.uint8 and out.shape == (10, 10)
    want = np.clip((img - lo) / (hi - lo), 0, 1) * 255
    assert np.array_equal(out, (want + 0.5).astype(np.uint8)[::-1])  # north up: FITS row 0 is the last row
    assert out[-1, 0] == 0 and out[0, -1] == 255
    flat = grey(np.full((5, 5), 3.0))
    assert flat is not None and (flat == 0).all()  # a flat image has no structure to show
    nan = np.full((4, 4), np.nan)
    assert grey(nan) is None
    nan[0, 0] = 1.0
    assert grey(nan).shape == (4, 4)


@pytest.mark.parametrize("gz", [True, False])
def test_stamp_png_round_trip(gz):
    from PIL import Image

    img = np.random.default_rng(1).normal(0, 1, (63, 63))
    png = stamp_png(fits_stamp(img, gz))
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (63, 63)
        assert np.array_equal(np.asarray(im), grey(img.astype(np.float32).astype(float)))
    assert stamp_png(None) is None and stamp_png(b"") is None and stamp_png(b"not a fits file") is None
