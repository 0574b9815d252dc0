"""ampel-dask: columnar, content-addressed analysis of astronomical alert streams on Dask."""

__version__ = "0.1.0"
