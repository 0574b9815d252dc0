"""T2PointPhotometry: per datapoint, its signal-to-noise ratio and the AB magnitude its flux gives.

What a T2PointUnit is for: a value of one measurement, the same in every state that holds it, so it is
computed once per datapoint (per content: a re-processed copy with other values is computed apart),
however many alerts and channels reach it. Forced photometry and Rubin sources carry a flux but no
magnitude; this gives them one, with its error, and marks which measurements are significant.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ...io.layout import NJY_ZP
from ..base import T2PointUnit, UnitConfig

POGSON = 2.5 / np.log(10.0)  # mag error per unit relative flux error (1.0857...)
OK, NO_FLUX = 0, 1


class PointPhotometryConfig(UnitConfig):
    min_snr: float = Field(5.0, gt=0, description="a datapoint is significant when flux / flux_err >= this")


class T2PointPhotometry(T2PointUnit):
    """Per datapoint: signal-to-noise ratio, AB magnitude and its error from the flux, significance.

    ``snr`` = flux / flux_err; where the flux is positive ``mag`` = 31.4 - 2.5 log10(flux / nJy) and
    ``mag_err`` = 1.0857 flux_err / flux; ``significant`` = snr >= ``min_snr``.

    ``code``: 0 ok; 1 = no flux or no positive flux error (an upper limit without a flux, say): all
    values null.
    """

    Config = PointPhotometryConfig
    version = "1"

    def process(self, points: pa.Table) -> pa.Table:
        flux = pc.fill_null(points.column("flux"), np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        err = pc.fill_null(points.column("flux_err"), np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        usable = np.isfinite(flux) & np.isfinite(err) & (err > 0)
        positive = usable & (flux > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(usable, flux / np.where(usable, err, 1.0), np.nan)
            safe = np.where(positive, flux, 1.0)
            mag = np.where(positive, NJY_ZP - 2.5 * np.log10(safe), np.nan)
            mag_err = np.where(positive, POGSON * err / safe, np.nan)
        return pa.table(
            {
                "snr": pa.array(snr, mask=~usable),
                "mag": pa.array(mag, mask=~positive),
                "mag_err": pa.array(mag_err, mask=~positive),
                "significant": pa.array(snr >= self.config.min_snr, mask=~usable),
                "code": pa.array(np.where(usable, OK, NO_FLUX).astype(np.int32)),
            }
        )


__all__ = ["T2PointPhotometry", "PointPhotometryConfig"]
