"""The README's command-line section is a contract: every shell command in it is a valid invocation,
and every one that is not a training run or the demo runs as written in an empty folder, shortened
only where a flag allows it (fewer frames; the CPU where the README asks for CUDA on a machine
without it). The training commands and the demo are parsed here and run by their own tests in
test_cli.py (train-despeckle, its torchrun form, train-register, demo), which keeps the suite short."""

import re
import shlex
import sys
from pathlib import Path


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
    flags = {"--frames": "2", "--steps": "1", "--nproc_per_node": "2", "--search-radius": "2"}
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


LONG = ("train-despeckle", "train-register", "demo")


def test_every_readme_command_parses():
    from us3d.cli import build_parser

    parser = build_parser()
    for command in readme_commands():
        words = shlex.split(command)
        arguments = words[words.index("us3d") + 1:] if "us3d" in words else words[1:]
        parser.parse_args(arguments)  # exits with code 2 on an unknown flag or a bad value


def test_every_readme_command_runs_as_written_in_an_empty_folder(tmp_path, monkeypatch):
    """In this process (`us3d.cli.main`, what the `us3d` script calls), to spare each command the start-up."""
    from us3d.cli import main

    monkeypatch.chdir(tmp_path)
    for command in readme_commands():
        if any(f" {name} " in f" {command} " for name in LONG):
            continue
        words = shortened(command)
        assert words[0] == str(BIN / "us3d"), command
        assert main(words[1:]) == 0, command
    assert (tmp_path / "registered" / "metrics.csv").is_file() and (tmp_path / "field.mha").is_file()
