"""Check that the bundled TorchScript models load and give the same output under another PyTorch
(the oldest one the Slicer modules accept, `us3d.dependencies.TORCH_REQUIREMENT`).

Usage, with a second Python that has only torch and numpy (e.g. a venv with an older torch)::

    python Testing/torch_compat.py --python /path/to/old-venv/bin/python

Each model runs on the same fixed input here and in the other interpreter; the script prints the
largest difference per model and exits 1 when a model fails to load or differs by more than 1e-4
(relative to the output's range).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "Resources" / "Models"

#: Runs in either interpreter: needs torch and numpy only (no us3d).
RUNNER = r"""
import json, sys
import numpy as np
import torch
models, out = json.loads(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
rng = np.random.default_rng(0)
volume = torch.from_numpy(rng.gamma(2.0, 40.0, (1, 1, 16, 64, 64)).astype(np.float32))
shifted = torch.roll(volume, 3, dims=3)
results = {"torch": torch.__version__}
for name, path, task in models:
    module = torch.jit.load(path, map_location="cpu").eval()
    with torch.inference_mode():
        output = module(volume, shifted) if task == "registration" else module(volume / volume.max())
    np.save(out + "/" + name + ".npy", output.numpy())
json.dump(results, open(out + "/versions.json", "w"))
"""


def run(python: str, models: list, folder: str) -> str:
    completed = subprocess.run([python, "-c", RUNNER, json.dumps(models), folder], capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{python} could not run the models:\n{completed.stderr.strip()[-2000:]}")
    return json.loads(Path(folder, "versions.json").read_text())["torch"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="the other interpreter (with the torch to check)")
    args = parser.parse_args(argv)
    import numpy as np

    manifest = json.loads((MODELS / "manifest.json").read_text())["models"]
    models = [(m["name"], str(MODELS / m["file"]), m["task"]) for m in manifest]
    with tempfile.TemporaryDirectory() as here, tempfile.TemporaryDirectory() as there:
        ours, theirs = run(sys.executable, models, here), run(args.python, models, there)
        failed = False
        for name, _, _ in models:
            a, b = np.load(Path(here, name + ".npy")), np.load(Path(there, name + ".npy"))
            scale = float(np.ptp(a)) or 1.0
            difference = float(np.abs(a - b).max()) / scale
            failed |= a.shape != b.shape or difference > 1e-4
            print(f"{name}: torch {theirs} vs {ours}: largest difference {difference:.2e} of the output's range")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
