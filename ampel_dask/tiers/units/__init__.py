"""Built-in units; registered under the ``ampel_dask.units`` entry-point group like any science package's."""
