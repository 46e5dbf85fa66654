"""Speckle filters on (k, j, i) volumes."""

from us3d.filters.obnlm import OBNLM_MODES, obnlm

__all__ = ["OBNLM_MODES", "obnlm"]
