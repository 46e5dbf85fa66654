"""Regenerate Docs/compare.png: USDespeckle's side-by-side comparison (input | OBNLM | U-Net),
rendered offscreen through MRML's slice logic on a slicer-core scene.

Run: .venv/bin/python Docs/screenshot_compare.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import SimpleITK as sitk
import slicer

from us3d.despeckling import ObnlmSettings, UnetSettings
from us3d.phantom import simulate_volume
from us3dmrml.despeckle import despeckle_volume_node
from us3dmrml.nodes import new_volume_node
from us3dmrml.views import color_logic, render_slice, side_by_side

OUTPUT = Path(__file__).resolve().parent / "compare.png"


def main() -> int:
    scene = slicer.vtkMRMLScene()
    colors = color_logic(scene)
    phantom = simulate_volume(seed=9001)  # a held-out seed: never used in training
    image = sitk.GetImageFromArray(phantom.bmode[0])
    image.SetSpacing(phantom.spacing)
    volume = new_volume_node(scene, image, "liver phantom")
    outputs = [despeckle_volume_node(scene, volume, settings, "cpu").output_node
               for settings in (ObnlmSettings(), UnetSettings("unet-obnlm"))]
    views = [render_slice(scene, node, window=(0.0, 255.0), size=(420, 300)) for node in [volume] + outputs]
    picture = side_by_side(views)
    sitk.WriteImage(sitk.GetImageFromArray(picture, isVector=True), str(OUTPUT))
    del colors
    print(f"wrote {OUTPUT} ({picture.shape[1]}x{picture.shape[0]}): input | OBNLM | unet-obnlm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
