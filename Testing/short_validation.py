"""The training commands' held-out sets cut to their first seed, for the suite's 2-step training runs:
their model cards then hold a handful of validation rows instead of twenty (about 15 s less each on 2
cores). Used in the test process by the `short_validation` fixture, and as a script under torchrun."""

import sys

from us3d.training import data, registration


def shorten(setattr_=setattr) -> None:
    """Keep the first seed of each held-out set (`setattr_`: pytest's monkeypatch.setattr to undo it)."""
    setattr_(data, "VALIDATION_SEEDS", data.VALIDATION_SEEDS[:1])
    setattr_(data, "VARIED_VALIDATION_SEEDS", data.VARIED_VALIDATION_SEEDS[:1])
    setattr_(registration, "VALIDATION", {name: seeds[:1] for name, seeds in registration.VALIDATION.items()})


if __name__ == "__main__":  # python short_validation.py <us3d arguments>
    from us3d.cli import main

    shorten()
    sys.exit(main(sys.argv[1:]))
