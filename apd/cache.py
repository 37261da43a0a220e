"""apd's cache directory: decoded datasets, feature networks and reference statistics."""

import os


def root() -> str:
    """$APD_CACHE when set and not empty, else ~/.cache/apd."""
    return os.environ.get("APD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "apd")
