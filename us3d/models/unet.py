"""The 3D dense U-Net despeckler (after the paper's architecture).

Arrays are (batch, channel, k, j, i): k is the elevation axis, (j, i) the B-mode plane.
Max-pooling halves only j and i, so 32 elevation slices stay 32 slices at every level.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

#: (j, i) sizes must be multiples of this: four in-plane poolings.
SIZE_MULTIPLE = 16


class Conv3d(nn.Conv3d):
    """nn.Conv3d that calls oneDNN directly on CPU float32 and bfloat16 tensors.

    torch's own heuristic sends single-volume inputs with few channels to a slow reference
    kernel; oneDNN on channels-last tensors is 3-30x faster there. Same weights, same result.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and (x.dtype == torch.float32 or x.dtype == torch.bfloat16):
            weight = self.weight.contiguous(memory_format=torch.channels_last_3d)
            return torch.mkldnn_convolution(x.contiguous(memory_format=torch.channels_last_3d), weight, self.bias,
                                            [p for p in self.padding], [s for s in self.stride], [1, 1, 1], 1)
        return F.conv3d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)


def channels_last(module: nn.Module) -> nn.Module:
    """`module` with its 5D weights stored channels-last, the layout `Conv3d` gives oneDNN on the CPU
    (otherwise each call makes a copy); in place, returned for chaining."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() == 5:
                parameter.data = parameter.data.contiguous(memory_format=torch.channels_last_3d)
    return module


class DenseBlock(nn.Module):
    """`layers` 3x3x3 convolutions + ReLU; each sees the concatenation of the block's input and
    every earlier output in the block (dense connections); the block returns that concatenation
    squeezed to `out_channels` by a 1x1x1 convolution."""

    def __init__(self, in_channels: int, growth: int, layers: int, out_channels: int,
                 kernel: tuple[int, int, int] = (3, 3, 3)) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        channels = in_channels
        for _ in range(layers):
            self.convs.append(Conv3d(channels, growth, kernel, padding=tuple(n // 2 for n in kernel)))
            channels += growth
        self.squeeze = Conv3d(channels, out_channels, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in self.convs:
            features.append(self.relu(conv(torch.cat(features, 1))))
        return self.relu(self.squeeze(torch.cat(features, 1)))


class DenseUNet3D(nn.Module):
    """Encoder of 4 levels, a bottom block, decoder of 4 levels; skips between matching levels.

    widths: channels of levels 1-4 and of the bottom block; growth: channels each convolution of a
    dense block adds, per level; kernel: the dense blocks' convolution kernel (k, j, i), (3, 3, 3)
    as in the paper, or (1, 3, 3), in-plane only, for a target computed slice by slice (each output
    slice then depends on its own input slice only, and a convolution costs a third). The output is
    the input plus a learned correction (global residual), in the normalised intensity scale of the input.
    """

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 48, 64), growth: tuple[int, ...] = (4, 8, 16, 24, 32),
                 layers: int = 2, kernel: tuple[int, int, int] = (3, 3, 3)) -> None:
        super().__init__()
        if len(widths) != 5 or len(growth) != 5:
            raise ValueError("widths and growth need 5 entries: levels 1-4 and the bottom block")
        if len(kernel) != 3 or any(n % 2 == 0 for n in kernel):
            raise ValueError("kernel needs 3 odd sizes (k, j, i)")
        self.widths = tuple(widths)
        self.growth = tuple(growth)
        self.kernel = tuple(kernel)
        self.encoders = nn.ModuleList()
        channels = 1
        for level in range(4):
            self.encoders.append(DenseBlock(channels, growth[level], layers, widths[level], kernel))
            channels = widths[level]
        self.pool = nn.MaxPool3d((1, 2, 2))
        self.bottom = DenseBlock(widths[3], growth[4], layers, widths[4], kernel)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        channels = widths[4]
        for level in reversed(range(4)):
            self.ups.append(nn.ConvTranspose3d(channels, widths[level], (1, 2, 2), stride=(1, 2, 2)))
            self.decoders.append(DenseBlock(2 * widths[level], growth[level], layers, widths[level], kernel))
            channels = widths[level]
        self.head = Conv3d(widths[0], 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 1 or x.shape[3] % 16 != 0 or x.shape[4] % 16 != 0:
            raise ValueError("input must be (batch, 1, k, j, i) with j and i multiples of 16")
        skips: List[torch.Tensor] = []
        y = x
        for encoder in self.encoders:
            y = encoder(y)
            skips.append(y)
            y = self.pool(y)
        y = self.bottom(y)
        for index, (up, decoder) in enumerate(zip(self.ups, self.decoders)):
            y = decoder(torch.cat([up(y), skips[3 - index]], 1))
        return x + self.head(y).contiguous()


def native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX), where oneDNN's bfloat16
    convolutions take about half the time of float32's; elsewhere they are emulated, and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def for_inference(module: nn.Module, bfloat16: bool | None = None) -> nn.Module:
    """The U-Net to run on the CPU: a scripted `DenseUNet3D` (a bundled model file) rebuilt as this
    module's class with its weights, so that its convolutions run in oneDNN channels-last (`Conv3d`)
    in float32 or bfloat16; any other module as it is.

    `bfloat16`: cast the rebuilt network to bfloat16 (None: where `native_bfloat16()`). It then takes
    about half the time of float32, at >= 45 dB PSNR against float32's output for the bundled models
    (Testing/test_unet.py; benchmarks/bench_device.py reports both for unet-obnlm). The rebuilt
    network must give the scripted one's output on a small random volume (to 1e-4), or the scripted
    one is kept.
    """
    if getattr(module, "original_name", None) != "DenseUNet3D":
        return module
    state = module.state_dict()
    blocks = [f"encoders.{level}" for level in range(4)] + ["bottom"]
    try:  # the architecture from the weights' shapes (older files carry no widths or kernel attributes)
        widths = tuple(state[f"{block}.squeeze.weight"].shape[0] for block in blocks)
        growth = tuple(state[f"{block}.convs.0.weight"].shape[0] for block in blocks)
        kernel = tuple(state["encoders.0.convs.0.weight"].shape[2:])
        layers = sum(1 for key in state if key.startswith("encoders.0.convs.") and key.endswith(".weight"))
        with torch.random.fork_rng(devices=[]):  # the initial weights, overwritten, leave the caller's RNG alone
            rebuilt = DenseUNet3D(widths, growth, layers, kernel)
        rebuilt.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError):
        return module
    device = next(module.parameters()).device
    rebuilt = channels_last(rebuilt.to(device).eval())
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn((1, 1, 4, 32, 32), generator=generator).to(device)
    with torch.inference_mode():
        if (module(volume) - rebuilt(volume)).abs().max() > 1e-4:
            return module
    if native_bfloat16() if bfloat16 is None else bfloat16:
        rebuilt = channels_last(rebuilt.to(torch.bfloat16))
    return rebuilt
