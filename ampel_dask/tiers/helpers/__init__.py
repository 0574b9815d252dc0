"""What units share that is not a unit: band light curves, drawing, catalog vetoes."""
