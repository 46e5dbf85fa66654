"""Files shipped beside the package in the extension's Resources/ folder."""

from __future__ import annotations

from pathlib import Path

from us3d.errors import InputError

RESOURCES = Path(__file__).resolve().parent.parent / "Resources"


def sample_data(name: str) -> Path:
    """Path of a bundled sample volume (Resources/SampleData/<name>)."""
    path = RESOURCES / "SampleData" / name
    if not path.exists():
        raise InputError(f"sample data {name} not found at {path}; is the extension's Resources folder installed?")
    return path
