"""The README's command-line section is a contract: every shell command in it runs as written in an
empty folder, shortened only where a flag allows it (fewer frames, steps, training volumes and
processes; the CPU where the README asks for CUDA on a machine without it)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Command line"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def shortened(command: str) -> list[str]:
    words = shlex.split(command)
    flags = {"--frames": "2", "--steps": "1", "--nproc_per_node": "2"}
    words = [flags.get(words[n - 1], word) if n else word for n, word in enumerate(words)]
    if "--device" in words and words[words.index("--device") + 1] == "cuda":
        import torch

        if not torch.cuda.is_available():
            words[words.index("--device") + 1] = "cpu"
    if "train-despeckle" in words:
        words += ["--standard", "1", "--varied", "1", "--batch-size", "1", "--crop", "8", "32", "32"]
    if "train-register" in words:
        words += ["--standard-sequences", "1", "--varied-sequences", "0", "--inputs", "none"]
    if words[:2] == ["us3d", "demo"]:
        words += ["--frames", "2"]
    if words[0] == "us3d":
        return [str(BIN / "us3d")] + words[1:]
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone"] + words[1:]
    raise AssertionError(f"unexpected command in the README: {command}")


def test_the_readme_lists_the_commands_a_user_needs():
    commands = " ".join(readme_commands())
    for command in ("phantom", "despeckle", "models", "register", "register-sequence", "train-despeckle",
                    "train-register", "metrics", "demo"):
        assert f"us3d {command} " in commands + " "


@pytest.mark.skipif(not (BIN / "us3d").exists(), reason="the us3d command is not installed beside this Python")
def test_every_readme_command_runs_as_written_in_an_empty_folder(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for command in readme_commands():
        done = subprocess.run(shortened(command), cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env=env)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    assert (tmp_path / "registered" / "metrics.csv").is_file() and (tmp_path / "OUTDIR" / "report.md").is_file()
