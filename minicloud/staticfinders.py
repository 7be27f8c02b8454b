"""Serves the plotly.js bundle that the plotly Python package ships as ``vendor/plotly.min.js`` (never a CDN)."""
from pathlib import Path

from django.contrib.staticfiles.finders import BaseFinder
from django.core.files.storage import FileSystemStorage

NAME = "vendor/plotly.min.js"


def _bundle_dir() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data"


class PlotlyFinder(BaseFinder):
    def check(self, **kwargs):
        return []

    def find(self, path, find_all=False, **kwargs):
        if path == NAME:
            found = str(_bundle_dir() / "plotly.min.js")
            return [found] if find_all else found
        return [] if find_all else None

    def list(self, ignore_patterns):
        storage = FileSystemStorage(location=str(_bundle_dir()))
        storage.prefix = "vendor"
        yield "plotly.min.js", storage
