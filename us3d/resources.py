"""Files shipped beside the package in the extension's Resources/ folder."""

from __future__ import annotations

import json
from pathlib import Path

from us3d.errors import InputError

RESOURCES = Path(__file__).resolve().parent.parent / "Resources"


def sample_data(name: str) -> Path:
    """Path of a bundled sample volume (Resources/SampleData/<name>)."""
    path = RESOURCES / "SampleData" / name
    if not path.exists():
        raise InputError(f"sample data {name} not found at {path}; is the extension's Resources folder installed?")
    return path


def read_manifest(manifest: Path | None = None) -> dict[str, dict]:
    """Bundled models by name (Resources/Models/manifest.json): {"file", "sha256", "task", "target", "card"}."""
    manifest = manifest or RESOURCES / "Models" / "manifest.json"
    if not manifest.exists():
        return {}
    return {entry["name"]: entry for entry in json.loads(manifest.read_text())["models"]}


def bundled_model_names(task: str = "despeckle") -> list[str]:
    """Names of the bundled models for `task` (despeckle or registration)."""
    return sorted(name for name, entry in read_manifest().items() if entry.get("task", "despeckle") == task)
