"""TorchScript model files with metadata, the bundled-model manifest, and hash-checked loading.

A model file is a TorchScript archive (`torch.jit.script`, any input size) holding
`metadata.json` in its extra files: architecture, normalisation, training target and
OBNLM parameters, us3d version, and `weights_sha256` (sha256 over the parameters).
`Resources/Models/manifest.json` lists each bundled model by name with the sha256 of its
file; loading by name refuses a file whose hash differs from the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import warnings
from pathlib import Path

import torch

from us3d.errors import InputError
from us3d.models.unet import channels_last
from us3d import resources
from us3d.resources import RESOURCES

MODELS_DIR = RESOURCES / "Models"
MANIFEST = MODELS_DIR / "manifest.json"
METADATA_FILE = "metadata.json"


@dataclasses.dataclass
class LoadedModel:
    """A scripted model ready for inference, its metadata and where it came from."""

    module: torch.jit.ScriptModule
    metadata: dict
    path: Path
    name: str

    @property
    def input_mapping(self) -> str:
        """How frames are normalised for this model (`us3d.models.inference.INPUT_MAPPINGS`)."""
        return self.metadata.get("input_mapping", "standardise")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else
                      tensor.float().numpy().tobytes())
    return digest.hexdigest()


def save_model(model: torch.nn.Module, path: str | Path, metadata: dict) -> str:
    """Script `model` (in eval mode, on CPU) and write it with `metadata`; returns the file's sha256."""
    model = model.cpu().eval()
    with warnings.catch_warnings():  # TorchScript is deprecated upstream but is what Slicer's torch loads
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
    metadata = dict(metadata, weights_sha256=weights_sha256(model))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: json.dumps(metadata, indent=1, sort_keys=True)})
    Path(path).write_bytes(buffer.getvalue())
    return file_sha256(path)


def read_manifest() -> dict[str, dict]:
    """Bundled models by name: {"file", "sha256", "target", "card"}."""
    return resources.read_manifest(MANIFEST)


def resolve_model(name_or_path: str) -> tuple[Path, str | None, str]:
    """(file, expected sha256 or None, display name) for a bundled model name or a file path."""
    manifest = read_manifest()
    if name_or_path in manifest:
        entry = manifest[name_or_path]
        return MODELS_DIR / entry["file"], entry["sha256"], name_or_path
    path = Path(name_or_path)
    if path.suffix in (".pt", ".pth", ".ts") or path.exists():
        if not path.is_file():
            raise InputError(f"model file {path} does not exist")
        return path, None, path.name
    names = ", ".join(sorted(manifest)) or "none installed"
    raise InputError(f"unknown model {name_or_path!r}: give a bundled model ({names}) or a .pt file")


def load_model(name_or_path: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a bundled model by name, or a model file, after checking its hashes."""
    path, expected, name = resolve_model(name_or_path)
    if not path.is_file():
        raise InputError(f"bundled model {name} is listed in the manifest but {path} is missing")
    if expected is not None and file_sha256(path) != expected:
        raise InputError(f"model file {path} does not match the sha256 in {MANIFEST.name} "
                         "(corrupt or replaced); reinstall the extension or restore the file")
    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as error:  # torch raises RuntimeError, ValueError or zipfile errors for bad files
        raise InputError(f"{path} is not a TorchScript model file ({type(error).__name__})") from None
    try:
        metadata = json.loads(extra[METADATA_FILE])
    except json.JSONDecodeError:
        metadata = {}
    if "weights_sha256" not in metadata:
        raise InputError(f"{path} has no us3d metadata (metadata.json); export it with us3d train-despeckle")
    if weights_sha256(module) != metadata["weights_sha256"]:
        raise InputError(f"the weights in {path} do not match the sha256 recorded in its metadata")
    module = module.to(device).eval()
    if torch.device(device).type == "cpu":  # the CPU convolutions run channels-last (see unet.Conv3d)
        channels_last(module)
    return LoadedModel(module, metadata, path, name)


def update_manifest(name: str, filename: str, sha256: str, target: str, task: str = "despeckle") -> None:
    """Add or replace a bundled model's entry in the manifest. `task`: despeckle or registration;
    `target`: what a despeckler reproduces, or a registration model's input pre-processing."""
    entries = read_manifest()
    entries[name] = {"name": name, "file": filename, "sha256": sha256, "task": task, "target": target,
                     "card": Path(filename).with_suffix(".md").name}
    MANIFEST.write_text(json.dumps({"models": [entries[n] for n in sorted(entries)]}, indent=2) + "\n")
