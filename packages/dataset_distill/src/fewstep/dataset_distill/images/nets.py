"""Networks that distil and evaluate synthetic image sets, and a functional forward pass.

* ``convnet``: the ConvNet of DC/DSA/DM/MTT/FTD (Zhao et al. 2021, Gidaris & Komodakis 2018):
  ``depth`` blocks of [3x3 conv (width) -> instance norm -> ReLU -> 2x2 average pool] and a
  linear classifier. The papers use width 128, depth 3 on 32x32 images, whose last block
  normalises 8x8 maps and pools them to 4x4. On 8x8 digits the default here is width 32 (64
  pixels instead of 1,024) and depth 2 (8 -> 4 -> 2): at depth 3 the last instance norm sees
  2x2 maps pooled to one value, where every channel's mean(relu(normalised)) is nearly
  constant, and fresh networks train to ~28 % instead of ~86 % on 100 digits.
* ``mlp``: DC's MLP, two hidden layers of 128 ReLU units.
* ``resnet``: a small residual network (ResNet-8 style: a stem and one basic block per stage,
  ``width/4, width/2, width`` channels, the last two stages downsampling), instance norm as
  DC's ``ResNet18`` uses by default, global average pooling.

Instance norm is ``GroupNorm(C, C)`` as in the DC code, so no network keeps running buffers and
:func:`functional_forward` can run any of them from a flat parameter vector (MTT, FTD).
Every network has ``embed(x) -> (B, F)``, the features the classifier reads (DM, herding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call


@dataclass
class NetConfig:
    arch: str = "convnet"  # network the method distils with: convnet, mlp or resnet
    width: int = 32  # convnet channels (resnet: channels of its last stage)
    depth: int = 2  # convnet blocks; each halves the image side (papers: 3 at 32x32)


def _instance_norm(c: int) -> nn.Module:
    return nn.GroupNorm(c, c, affine=True)


class ConvNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, image_size: int, width: int, depth: int):
        super().__init__()
        if depth < 1 or image_size >> depth < 1:
            raise ValueError(
                f"convnet depth must be in 1..log2(image_size) = {image_size.bit_length() - 1} "
                f"for {image_size}x{image_size} images, got {depth}"
            )
        layers: list[nn.Module] = []
        c = channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(c, width, 3, padding=1),
                _instance_norm(width),
                nn.ReLU(),
                nn.AvgPool2d(2),
            ]
            c = width
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(width * (image_size >> depth) ** 2, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


class MLP(nn.Module):
    def __init__(self, channels: int, num_classes: int, image_size: int, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * image_size**2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


class BasicBlock(nn.Module):
    """He et al. 2016: relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _instance_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _instance_norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _instance_norm(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, image_size: int, width: int):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"resnet needs images of at least 4x4, got {image_size}")
        w = max(width // 4, 4)
        self.stem = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1, bias=False), _instance_norm(w), nn.ReLU()
        )
        self.blocks = nn.Sequential(
            BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2)
        )
        self.classifier = nn.Linear(4 * w, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


# arch name -> (channels, num_classes, image_size, NetConfig) -> module
NETS: dict[str, Callable[[int, int, int, NetConfig], nn.Module]] = {
    "convnet": lambda c, k, s, cfg: ConvNet(c, k, s, cfg.width, cfg.depth),
    "mlp": lambda c, k, s, cfg: MLP(c, k, s),
    "resnet": lambda c, k, s, cfg: ResNet(c, k, s, cfg.width),
}


def make_net(
    cfg: NetConfig, channels: int, num_classes: int, image_size: int, arch: str | None = None
) -> nn.Module:
    """A freshly initialised network (PyTorch's default init, from the global RNG).

    ``arch`` overrides ``cfg.arch`` (cross-architecture evaluation)."""
    name = arch or cfg.arch
    if name not in NETS:
        raise KeyError(f"unknown architecture {name!r}; available: {', '.join(NETS)}")
    return NETS[name](channels, num_classes, image_size, cfg)


def flat_params(net: nn.Module) -> Tensor:
    """All parameters of ``net`` concatenated in ``named_parameters`` order: (P,)."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def unflatten(net: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """Split a flat vector (P,) into views shaped like ``net``'s parameters (graph kept)."""
    named = list(net.named_parameters())
    total = sum(p.numel() for _, p in named)
    if flat.ndim != 1 or flat.numel() != total:
        raise ValueError(
            f"expected a flat parameter vector of shape ({total},), got {tuple(flat.shape)}"
        )
    out, i = {}, 0
    for name, p in named:
        out[name] = flat[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def functional_forward(net: nn.Module, flat: Tensor, x: Tensor) -> Tensor:
    """``net(x)`` with its parameters taken from ``flat`` (P,), differentiable in both
    (MTT's student network: Cazenavette et al. 2022, Alg. 1 inner loop)."""
    return functional_call(net, unflatten(net, flat), (x,))
