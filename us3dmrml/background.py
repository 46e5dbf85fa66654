"""A `us3d` command in a child process on temporary files: how the Slicer modules run heavy work
without blocking Slicer's GUI (the widget polls `BackgroundRun.poll` from a QTimer).

The child is `python -m us3d ARGUMENTS` in a fresh temporary folder that holds its inputs, outputs
and log (stdout and stderr together). Progress comes from the command's per-frame lines
("despeckle: frame 3/8"); a failed command's own error line becomes the InputError raised by
`check`. `cancel` kills the child; `cancel`, `check` on failure and `close` remove the folder,
so nothing is left behind. No Qt here: the same code is tested on slicer-core.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from us3d.errors import InputError

_PROGRESS = re.compile(r"^\w[\w-]*: frame (\d+)/(\d+)\s*$")
_ERROR = re.compile(r"^us3d [\w-]+: error: (.*)$")


def new_folder() -> Path:
    """A new private temporary folder for one run."""
    return Path(tempfile.mkdtemp(prefix="us3d-run-"))


class BackgroundRun:
    """One `python -m us3d ...` child process working in `folder`."""

    def __init__(self, arguments: list[str], folder: Path, python: str | None = None) -> None:
        self.folder = Path(folder)
        self.log_path = self.folder / "log.txt"
        package_root = str(Path(__file__).resolve().parent.parent)  # where us3d and us3dmrml live
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                               if p])
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([python or sys.executable, "-m", "us3d", *map(str, arguments)],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=self.folder, env=env)

    def poll(self) -> bool:
        """True once the child has finished (successfully or not)."""
        return self.process.poll() is not None

    def _lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def progress(self) -> tuple[int, int] | None:
        """(frames done, total) from the last progress line, or None before the first."""
        for line in reversed(self._lines()):
            match = _PROGRESS.match(line)
            if match:
                return int(match.group(1)), int(match.group(2))
        return None

    def check(self) -> None:
        """Wait for the child; on failure raise InputError with its error line (the folder is removed)."""
        code = self.process.wait()
        if code == 0:
            return
        lines = self._lines()
        errors = [m.group(1) for m in map(_ERROR.match, lines) if m]
        message = errors[-1] if errors else (lines[-1] if lines else f"the worker exited with code {code}")
        self.close()
        raise InputError(message)

    def cancel(self) -> None:
        """Stop the child now and remove everything it made."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
