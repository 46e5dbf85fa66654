"""Reading and writing 3D volumes (SimpleITK) and 4D volume sequences (Slicer's .seq.nrrd).

Arrays are in (k, j, i) order, sequences in (t, k, j, i). Geometry follows ITK: spacing and
origin in (x, y, z) = (i, j, k) order, mm, LPS; direction is a 3x3 matrix whose columns are the
i, j, k axis directions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import nrrd
import numpy as np
import SimpleITK as sitk

from us3d.errors import InputError
from us3d.geometry import LPS_FROM_RAS

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
SEQUENCE_SUFFIX = ".seq.nrrd"


@dataclasses.dataclass
class VolumeSequence:
    """A 4D sequence of 3D volumes sharing one geometry (a Slicer volume sequence)."""

    frames: np.ndarray  # (t, k, j, i)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    index_values: list[str] | None = None
    index_name: str = "time"
    index_unit: str = "s"
    index_type: str | None = None  # "numeric" or "text" (Slicer's index types); None: numeric if every value is

    def __post_init__(self) -> None:
        if self.frames.ndim != 4:
            raise InputError(f"a sequence needs (t, k, j, i) frames, got {self.frames.ndim} dimensions")
        if self.index_values is None:
            self.index_values = [str(t) for t in range(len(self.frames))]
        if len(self.index_values) != len(self.frames):
            raise InputError("a sequence needs one index value per frame")
        if self.index_type is None:
            self.index_type = "numeric" if _all_numeric(self.index_values) else "text"
        if self.index_type not in ("numeric", "text") or (self.index_type == "numeric"
                                                          and not _all_numeric(self.index_values)):
            raise InputError(f"index type {self.index_type!r} does not fit the index values (numeric or text)")
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    def __len__(self) -> int:
        return len(self.frames)

    def frame_image(self, index: int) -> sitk.Image:
        """Frame `index` as a SimpleITK image with the sequence's geometry."""
        return to_image(self.frames[index], self)

    def images(self) -> Iterator[sitk.Image]:
        for index in range(len(self)):
            yield self.frame_image(index)

    def with_frames(self, frames: np.ndarray) -> "VolumeSequence":
        """A new sequence with the same geometry and index values and other frames."""
        return dataclasses.replace(self, frames=frames, index_values=list(self.index_values))

    @classmethod
    def from_images(cls, images: list[sitk.Image], index_values: list[str] | None = None,
                    index_name: str = "time", index_unit: str = "s",
                    index_type: str | None = None) -> "VolumeSequence":
        reference = images[0]
        for image in images[1:]:
            if image.GetSize() != reference.GetSize():
                raise InputError("all frames of a sequence must have the same size")
        frames = np.stack([sitk.GetArrayFromImage(image) for image in images])
        return cls(frames, reference.GetSpacing(), reference.GetOrigin(),
                   np.array(reference.GetDirection()).reshape(3, 3), index_values, index_name, index_unit, index_type)


def to_image(array: np.ndarray, geometry: "sitk.Image | VolumeSequence") -> sitk.Image:
    """SimpleITK image of a (k, j, i) array with the geometry of an image or sequence."""
    image = sitk.GetImageFromArray(array)
    if isinstance(geometry, VolumeSequence):
        image.SetSpacing(tuple(float(s) for s in geometry.spacing))
        image.SetOrigin(tuple(float(o) for o in geometry.origin))
        image.SetDirection(tuple(float(d) for d in geometry.direction.ravel()))
    else:
        image.CopyInformation(geometry)
    return image


def is_sequence_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(SEQUENCE_SUFFIX)


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse an output that is one of the inputs or has no known volume suffix."""
    out = Path(output)
    for path in inputs:
        if Path(path).resolve() == out.resolve():
            raise InputError(f"output {out} is the same file as the input; choose another name")
    if not str(out).lower().endswith(VOLUME_SUFFIXES):
        raise InputError(f"output {out} must end with one of {', '.join(VOLUME_SUFFIXES)}")
    if not out.parent.exists():
        raise InputError(f"output folder {out.parent} does not exist")
    return out


def _check_input_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a volume file")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty")
    return path


def _check_array(array: np.ndarray, path: Path, what: str) -> None:
    if array.size == 0:
        raise InputError(f"{path}: the {what} has no voxels")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"{path}: the {what} contains NaN or infinite values")


def read_volume(path: str | os.PathLike) -> sitk.Image:
    """Read a scalar 3D volume, with its geometry; raise InputError on anything else."""
    path = _check_input_file(path)
    if is_sequence_path(path):
        raise InputError(f"{path} is a 4D sequence; a 3D volume is needed here")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"{path}: not a readable volume (supported: {', '.join(VOLUME_SUFFIXES)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: a scalar (grey-level) volume is needed, this one has "
                         f"{image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector)")
    if image.GetDimension() != 3:
        raise InputError(f"{path}: a 3D volume is needed, this image is {image.GetDimension()}D")
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{path}: complex voxels are not supported")
    _check_array(sitk.GetArrayViewFromImage(image), path, "volume")
    return image


_FLOAT_PIXELS = (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)


def write_volume(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write `image` as it is; integer voxels compressed. Float voxels (filter outputs, displacement
    fields) are written uncompressed: zlib shrinks them by a few percent and takes seconds at 4D
    frame sizes (a 256x256x128 displacement field: 2.5 s for 4% less)."""
    sitk.WriteImage(image, str(path), useCompression=image.GetPixelID() not in _FLOAT_PIXELS)


def read_sequence(path: str | os.PathLike) -> VolumeSequence:
    """Read a 4D .seq.nrrd volume sequence (list axis first, as older Slicer writes, or last)."""
    path = _check_input_file(path)
    try:
        data, header = nrrd.read(str(path), index_order="C")
    except Exception:  # pynrrd raises several types for malformed files
        raise InputError(f"{path}: not a readable NRRD sequence file") from None
    kinds = [k.lower() for k in header.get("kinds", [])]
    if data.ndim != 4 or "list" not in kinds:
        raise InputError(f"{path}: a 4D volume sequence (one list axis and 3 spatial axes) is needed")
    list_axis = kinds.index("list")  # axis in NRRD (fastest-first) order
    c_axis = 3 - list_axis
    frames = np.moveaxis(data, c_axis, 0)
    _check_array(frames, path, "sequence")
    directions = np.asarray(header.get("space directions"))
    columns = []
    for row in directions:
        row = np.asarray(row, dtype=float)
        if not np.all(np.isnan(row)):
            columns.append(row)
    if len(columns) != 3:
        raise InputError(f"{path}: the sequence has no usable space directions")
    matrix = np.stack(columns, axis=1)  # columns = i, j, k axis vectors (with spacing)
    origin = np.asarray(header.get("space origin", [0.0, 0.0, 0.0]), dtype=float)
    space = header.get("space", "left-posterior-superior").lower()
    if space in ("right-anterior-superior", "ras"):
        matrix, origin = LPS_FROM_RAS @ matrix, LPS_FROM_RAS @ origin
    elif space not in ("left-posterior-superior", "lps"):
        raise InputError(f"{path}: unsupported NRRD space {space!r}")
    spacing = np.linalg.norm(matrix, axis=0)
    direction = matrix / spacing
    values = header.get(f"axis {list_axis} index values", "")
    index_values = values.split() if values else None
    labels = header.get("labels")
    index_name = labels[list_axis] if labels and labels[list_axis] else "time"
    units = header.get("units")
    index_unit = units[list_axis] if units and units[list_axis] else "s"
    index_type = header.get(f"axis {list_axis} index type")
    return VolumeSequence(np.ascontiguousarray(frames), tuple(spacing), tuple(origin), direction,
                          index_values, index_name, index_unit, index_type if index_type in ("numeric", "text") else None)


def _sequence_header(sequence: VolumeSequence, dtype: np.dtype) -> tuple[dict, dict]:
    """(pynrrd header, its custom field types) of a .seq.nrrd of `sequence`'s geometry and frames of `dtype`."""
    matrix = sequence.direction * np.asarray(sequence.spacing)[None, :]
    header = {
        "type": np.dtype(dtype).name,
        "space": "left-posterior-superior",
        "space directions": np.vstack([matrix.T, np.full(3, np.nan)]),
        "kinds": ["domain", "domain", "domain", "list"],
        "labels": ["", "", "", sequence.index_name],
        "units": ["", "", "", sequence.index_unit],
        "space origin": np.asarray(sequence.origin, dtype=float),
        "encoding": "gzip" if np.issubdtype(dtype, np.integer) else "raw",
        "DataNodeClassName": "vtkMRMLScalarVolumeNode",
        "axis 3 index type": sequence.index_type,
        "axis 3 index values": " ".join(sequence.index_values),
    }
    fields = {key: "string" for key in ("DataNodeClassName", "axis 3 index type", "axis 3 index values")}
    return header, fields


def write_sequence(sequence: VolumeSequence, path: str | os.PathLike) -> None:
    """Write a sequence as a Slicer .seq.nrrd (list axis last, as current Slicer writes; LPS).

    Integer frames are gzip-compressed; floating-point frames are written raw: gzip saves about a
    tenth of their size and costs about 1.3 s per 256x256x128 float32 frame, more than despeckling it.
    """
    header, fields = _sequence_header(sequence, sequence.frames.dtype)
    # NRRD lists the fastest axis first, so (i, j, k, list) is (t, k, j, i) in C order.
    frames = np.ascontiguousarray(sequence.frames)
    if header["encoding"] == "raw" and _write_raw_nrrd(path, frames, header, fields):
        return
    nrrd.write(str(path), frames, header, index_order="C", custom_field_map=fields)


class SequenceWriter:
    """Writes the float32 frames of a sequence with `like`'s geometry, frame count and index values
    into a raw .seq.nrrd as they are made, in order, so a long sequence is never held in memory
    (`write_sequence` writes the same file from a whole array). Use it as a context manager: leaving
    the block with fewer frames than `like` has raises InputError; write to a temporary path
    (`atomic_outputs`) so that a failed run leaves no partial file.
    """

    def __init__(self, path: str | os.PathLike, like: VolumeSequence) -> None:
        from nrrd.writer import _handle_header, _write_header  # pynrrd's own header writer

        self.path, self.expected, self.written = str(path), len(like), 0
        self.shape = tuple(like.frames.shape[1:])
        header, fields = _sequence_header(like, np.float32)
        layout = np.broadcast_to(np.zeros((), np.float32), (self.expected,) + self.shape)  # shape and type only
        self._file = open(self.path, "wb")
        _write_header(self._file, _handle_header(layout, header, index_order="C"), fields)

    def write(self, frame: np.ndarray) -> None:
        """Append the next frame (k, j, i), written as float32."""
        frame = np.asarray(frame)
        if frame.shape != self.shape:
            raise InputError(f"frame of shape {frame.shape}, the sequence's are {self.shape}")
        if self.written >= self.expected:
            raise InputError(f"the sequence has {self.expected} frames")
        np.ascontiguousarray(frame, dtype=np.float32).tofile(self._file)
        self.written += 1

    def __enter__(self) -> "SequenceWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._file.close()
        if kind is None and self.written != self.expected:
            raise InputError(f"{self.written} of the sequence's {self.expected} frames were written")


def _write_raw_nrrd(path: str | os.PathLike, frames: np.ndarray, header: dict, fields: dict) -> bool:
    """Write an uncompressed NRRD from the array's own buffer; False where this pynrrd lacks the header
    writer used. (`nrrd.write` first copies the whole array into one bytes object: for a 40-frame
    256x256x128 float32 sequence, 1.3 GB more at the peak.)"""
    try:
        from nrrd.writer import _handle_header, _write_header  # pynrrd's own header writer
    except ImportError:
        return False
    with open(path, "wb") as file:
        _write_header(file, _handle_header(frames, dict(header), index_order="C"), fields)
        frames.tofile(file)
    return True


def _all_numeric(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def read_volume_or_sequence(path: str | os.PathLike) -> sitk.Image | VolumeSequence:
    return read_sequence(path) if is_sequence_path(path) else read_volume(path)


def write_any(data: sitk.Image | VolumeSequence, path: str | os.PathLike) -> None:
    if isinstance(data, VolumeSequence):
        write_sequence(data, path)
    else:
        write_volume(data, path)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (SEQUENCE_SUFFIX, ".nii.gz"):
        if name.endswith(suffix):
            return suffix
    return path.suffix


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike]) -> Iterator[list[str]]:
    """Temporary paths beside `paths`, all moved into place only if the block succeeds.

    A failed or interrupted write leaves none of the outputs behind (nor a temporary file).
    """
    temporaries = []
    try:
        for path in map(Path, paths):
            handle, temporary = tempfile.mkstemp(prefix=".us3d-", suffix=_suffix(path), dir=path.parent)
            os.close(handle)
            temporaries.append(temporary)
        yield list(temporaries)
        umask = os.umask(0)
        os.umask(umask)
        for temporary, path in zip(temporaries, paths):
            os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes private files; outputs are ordinary ones
            os.replace(temporary, path)
    finally:
        for temporary in temporaries:
            if os.path.exists(temporary):
                os.remove(temporary)
