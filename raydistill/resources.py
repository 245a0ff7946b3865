"""Files shipped inside the package: prompts, the upstream pins, the paper's published numbers.

They live in ``raydistill/data/`` (the checkout's top-level ``data/`` points there) and are found
through :mod:`importlib.resources`, so an installed wheel reads the same files as a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def package_data(*parts: str) -> Path:
    """The path of a file or folder under ``raydistill/data/``."""
    return Path(str(resources.files("raydistill").joinpath("data", *parts)))
