"""Neural models: the 3D dense U-Net despeckler, its bundled weights and inference."""
