"""The choices a user makes, in one torch-free place: the CLI, the Slicer modules and the logic
layer read them from here instead of copying the lists."""

#: Compute devices: "auto" picks CUDA when present.
DEVICES = ("auto", "cpu", "cuda")
#: OBNLM modes: each k-slice in 2D as the public implementation does, or 3D blocks.
OBNLM_MODES = ("slicewise", "3d")
#: Despeckling methods.
DESPECKLE_METHODS = ("obnlm", "unet")
#: Registration methods: the VoxelMorph network then per-pair refinement; an FFT translation then
#: the same refinement; SimpleITK's demons.
REGISTRATION_METHODS = ("voxelmorph", "translation", "demons")
#: Pre-processing of both volumes before registration.
REGISTRATION_PREPROCESSING = ("none", "gaussian", "obnlm", "unet")
#: Per-pair refinement steps after the network or translation by default (0: the pure network).
DEFAULT_REFINE_STEPS = 24
