"""YOLOX (Ge et al., "YOLOX: Exceeding YOLO Series in 2021") in plain torch.

CSPDarknet backbone (Focus stem, CSP stages, SPP), PAFPN neck and the decoupled head, with the
module names of the official implementation so its checkpoints (state dict under ``model``)
load strictly. Sizes follow the published depth/width multipliers; Nano uses depthwise
separable convolutions in backbone, neck and head.

``YOLOX.forward`` returns the raw head output of the official ONNX exports: (N, A, 5 + C) with
box offsets still on the grid (``reg``), sigmoid objectness and sigmoid class scores, levels of
stride 8, 16, 32 concatenated row-major. :func:`decode_boxes` applies grids and strides.
BatchNorm uses eps 1e-3 as in YOLOX training (the eps is not stored in checkpoints, so a
default 1e-5 would silently shift every activation); :func:`fold_batchnorm` removes it for inference.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# name -> (depth multiplier, width multiplier, depthwise), as published
YOLOX_SIZES = {
    "yolox_nano": (0.33, 0.25, True),
    "yolox_tiny": (0.33, 0.375, False),
    "yolox_s": (0.33, 0.50, False),
    "yolox_m": (0.67, 0.75, False),
    "yolox_l": (1.0, 1.0, False),
    "yolox_x": (1.33, 1.25, False),
}
STRIDES = (8, 16, 32)
BN_EPS = 1e-3


class BaseConv(nn.Module):
    """Convolution ("same" padding) → BatchNorm → SiLU."""

    def __init__(self, cin, cout, ksize, stride=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ksize, stride, (ksize - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class DWConv(nn.Module):
    """Depthwise k×k then pointwise 1×1, each a :class:`BaseConv` (Nano's cheap convolution)."""

    def __init__(self, cin, cout, ksize, stride=1):
        super().__init__()
        self.dconv = BaseConv(cin, cin, ksize, stride, groups=cin)
        self.pconv = BaseConv(cin, cout, 1, 1)

    def forward(self, x):
        return self.pconv(self.dconv(x))


def _conv(depthwise: bool):
    return DWConv if depthwise else BaseConv


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, shortcut=True, expansion=0.5, depthwise=False):
        super().__init__()
        hidden = int(cout * expansion)
        self.conv1 = BaseConv(cin, hidden, 1, 1)
        self.conv2 = _conv(depthwise)(hidden, cout, 3, 1)
        self.use_add = shortcut and cin == cout

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        return y + x if self.use_add else y


class CSPLayer(nn.Module):
    """CSP block: one branch through ``n`` bottlenecks, one straight, concatenated, mixed by 1×1."""

    def __init__(self, cin, cout, n=1, shortcut=True, expansion=0.5, depthwise=False):
        super().__init__()
        hidden = int(cout * expansion)
        self.conv1 = BaseConv(cin, hidden, 1, 1)
        self.conv2 = BaseConv(cin, hidden, 1, 1)
        self.conv3 = BaseConv(2 * hidden, cout, 1, 1)
        self.m = nn.Sequential(*[Bottleneck(hidden, hidden, shortcut, 1.0, depthwise) for _ in range(n)])

    def forward(self, x):
        x1, x2 = self.conv1(x), self.conv2(x)  # this call order is the exports' Conv order
        return self.conv3(torch.cat((self.m(x1), x2), dim=1))


class SPPBottleneck(nn.Module):
    """Max pools of 5, 9, 13 (stride 1) concatenated with their input: a wide receptive field cheaply."""

    def __init__(self, cin, cout, kernel_sizes=(5, 9, 13)):
        super().__init__()
        hidden = cin // 2
        self.conv1 = BaseConv(cin, hidden, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.conv2 = BaseConv(hidden * (len(kernel_sizes) + 1), cout, 1, 1)

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.m], dim=1))


class Focus(nn.Module):
    """Space-to-depth (2×2 pixel blocks → channels, order TL, BL, TR, BR) then a convolution."""

    def __init__(self, cin, cout, ksize=1, stride=1):
        super().__init__()
        self.conv = BaseConv(cin * 4, cout, ksize, stride)

    def forward(self, x):
        x = torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), dim=1)
        return self.conv(x)


class CSPDarknet(nn.Module):
    def __init__(self, depth: float, width: float, depthwise: bool = False):
        super().__init__()
        Conv = _conv(depthwise)
        c = int(width * 64)
        n = max(round(depth * 3), 1)
        self.stem = Focus(3, c, ksize=3)
        self.dark2 = nn.Sequential(Conv(c, c * 2, 3, 2), CSPLayer(c * 2, c * 2, n=n, depthwise=depthwise))
        self.dark3 = nn.Sequential(Conv(c * 2, c * 4, 3, 2), CSPLayer(c * 4, c * 4, n=n * 3, depthwise=depthwise))
        self.dark4 = nn.Sequential(Conv(c * 4, c * 8, 3, 2), CSPLayer(c * 8, c * 8, n=n * 3, depthwise=depthwise))
        self.dark5 = nn.Sequential(
            Conv(c * 8, c * 16, 3, 2), SPPBottleneck(c * 16, c * 16),
            CSPLayer(c * 16, c * 16, n=n, shortcut=False, depthwise=depthwise),
        )

    def forward(self, x):
        x = self.dark2(self.stem(x))
        dark3 = self.dark3(x)
        dark4 = self.dark4(dark3)
        return dark3, dark4, self.dark5(dark4)


class YOLOPAFPN(nn.Module):
    """Top-down then bottom-up feature pyramid over the backbone's stride 8/16/32 outputs."""

    def __init__(self, depth: float, width: float, in_channels=(256, 512, 1024), depthwise: bool = False):
        super().__init__()
        Conv = _conv(depthwise)
        c0, c1, c2 = (int(ch * width) for ch in in_channels)
        n = round(3 * depth)
        self.backbone = CSPDarknet(depth, width, depthwise)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral_conv0 = BaseConv(c2, c1, 1, 1)
        self.C3_p4 = CSPLayer(2 * c1, c1, n, False, depthwise=depthwise)
        self.reduce_conv1 = BaseConv(c1, c0, 1, 1)
        self.C3_p3 = CSPLayer(2 * c0, c0, n, False, depthwise=depthwise)
        self.bu_conv2 = Conv(c0, c0, 3, 2)
        self.C3_n3 = CSPLayer(2 * c0, c1, n, False, depthwise=depthwise)
        self.bu_conv1 = Conv(c1, c1, 3, 2)
        self.C3_n4 = CSPLayer(2 * c1, c2, n, False, depthwise=depthwise)

    def forward(self, x):
        x2, x1, x0 = self.backbone(x)
        fpn_out0 = self.lateral_conv0(x0)
        f_out0 = self.C3_p4(torch.cat([self.upsample(fpn_out0), x1], 1))
        fpn_out1 = self.reduce_conv1(f_out0)
        pan_out2 = self.C3_p3(torch.cat([self.upsample(fpn_out1), x2], 1))
        pan_out1 = self.C3_n3(torch.cat([self.bu_conv2(pan_out2), fpn_out1], 1))
        pan_out0 = self.C3_n4(torch.cat([self.bu_conv1(pan_out1), fpn_out0], 1))
        return pan_out2, pan_out1, pan_out0


class YOLOXHead(nn.Module):
    """Decoupled head: per level a 1×1 stem, then separate classification and regression towers."""

    def __init__(self, num_classes: int, width: float, in_channels=(256, 512, 1024), depthwise: bool = False):
        super().__init__()
        Conv = _conv(depthwise)
        hidden = int(256 * width)
        self.num_classes = num_classes
        self.stems = nn.ModuleList(BaseConv(int(ch * width), hidden, 1, 1) for ch in in_channels)
        self.cls_convs = nn.ModuleList(nn.Sequential(Conv(hidden, hidden, 3, 1), Conv(hidden, hidden, 3, 1))
                                       for _ in in_channels)
        self.reg_convs = nn.ModuleList(nn.Sequential(Conv(hidden, hidden, 3, 1), Conv(hidden, hidden, 3, 1))
                                       for _ in in_channels)
        self.cls_preds = nn.ModuleList(nn.Conv2d(hidden, num_classes, 1) for _ in in_channels)
        self.reg_preds = nn.ModuleList(nn.Conv2d(hidden, 4, 1) for _ in in_channels)
        self.obj_preds = nn.ModuleList(nn.Conv2d(hidden, 1, 1) for _ in in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        outputs = []
        for k, x in enumerate(features):
            x = self.stems[k](x)
            cls_out = self.cls_preds[k](self.cls_convs[k](x))  # call order as official (ONNX import relies on it)
            reg_feat = self.reg_convs[k](x)
            out = torch.cat([self.reg_preds[k](reg_feat), self.obj_preds[k](reg_feat).sigmoid(), cls_out.sigmoid()], 1)
            # (N, C, H, W) → (N, H·W, C), anchors row-major; a free view for channels-last tensors
            outputs.append(out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, out.shape[1]))
        return torch.cat(outputs, dim=1)


class YOLOX(nn.Module):
    def __init__(self, depth: float, width: float, depthwise: bool = False, num_classes: int = 80):
        super().__init__()
        self.backbone = YOLOPAFPN(depth, width, depthwise=depthwise)
        self.head = YOLOXHead(num_classes, width, depthwise=depthwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BGR 0–255 float (N, 3, H, W), H and W multiples of 32 → raw head output (N, A, 5 + C)."""
        return self.head(self.backbone(x))


def build_yolox(name: str, num_classes: int = 80) -> YOLOX:
    if name not in YOLOX_SIZES:
        raise ValueError(f"unknown YOLOX size {name!r}; one of {', '.join(YOLOX_SIZES)}")
    depth, width, depthwise = YOLOX_SIZES[name]
    return YOLOX(depth, width, depthwise, num_classes)


def infer_yolox_size(state_dict: dict[str, torch.Tensor]) -> str:
    """The size whose stem width and depthwise-ness match a checkpoint, for files not known by name."""
    width = state_dict["backbone.backbone.stem.conv.conv.weight"].shape[0] / 64
    depthwise = any(".dconv." in k for k in state_dict)
    prefix = "backbone.backbone.dark3.1.m."
    depth = sum(1 for k in state_dict if k.startswith(prefix) and k.endswith("conv1.conv.weight")) / 3
    for name, (d, w, dw) in YOLOX_SIZES.items():
        if abs(w - width) < 1e-6 and dw == depthwise and max(round(d * 3), 1) == depth:
            return name
    raise ValueError(f"checkpoint matches no YOLOX size (stem width {width:.3f}, depth {depth:.0f}, "
                     f"depthwise {depthwise})")


def load_yolox_state(model: YOLOX, state_dict: dict[str, torch.Tensor]) -> None:
    """Strict load, with a short message naming what differs (the usual cause: a different size)."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit this YOLOX: missing {missing[:5]}, unexpected {unexpected[:5]}")


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each :class:`BaseConv`'s BatchNorm (eval statistics) into its convolution, in place."""
    for module in model.modules():
        if isinstance(module, BaseConv) and isinstance(module.bn, nn.BatchNorm2d):
            conv, bn = module.conv, module.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = bn.bias - bn.running_mean * scale
            conv.bias = nn.Parameter(bias if conv.bias is None else conv.bias * scale + bias)
            module.bn = nn.Identity()
    return model


def decode_boxes(raw: torch.Tensor, input_hw: tuple[int, int], strides: Sequence[int] = STRIDES) -> torch.Tensor:
    """Raw head output → (N, A, 4) boxes (cx, cy, w, h) in input pixels.

    Centre = (predicted offset + grid cell) × stride, size = exp(predicted log-size) × stride.
    """
    height, width = input_hw
    grids, scales = [], []
    for stride in strides:
        h, w = height // stride, width // stride
        ys, xs = torch.meshgrid(torch.arange(h, device=raw.device), torch.arange(w, device=raw.device), indexing="ij")
        grids.append(torch.stack((xs, ys), 2).reshape(-1, 2))
        scales.append(torch.full((h * w, 1), float(stride), device=raw.device))
    grid = torch.cat(grids).to(raw.dtype)
    stride = torch.cat(scales).to(raw.dtype)
    if grid.shape[0] != raw.shape[1]:
        raise ValueError(f"{raw.shape[1]} anchors do not fit an input of {height}×{width}")
    return torch.cat([(raw[..., :2] + grid) * stride, torch.exp(raw[..., 2:4]) * stride], dim=-1)


class FusedConv(nn.Module):
    """A folded convolution run as one oneDNN call: convolution + bias + ``attr`` ("swish" = SiLU, or "none").

    ``torch.ops.mkldnn._convolution_pointwise`` is the kernel torch.compile's CPU backend emits
    for this pattern; calling it eagerly saves a pass over every activation (SiLU alone was ~20%
    of Nano's CPU time), and keeps the head's 1×1 predictions off the slow im2col path eager torch
    picks for them at one thread. It is a private op, so :func:`fuse_conv_silu` checks it before use.
    """

    def __init__(self, conv: nn.Conv2d, attr: str = "swish"):
        super().__init__()
        self.conv, self.attr = conv, attr
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def forward(self, x):
        padding, stride, dilation, groups = self.args
        return torch.ops.mkldnn._convolution_pointwise(x, self.conv.weight, self.conv.bias, padding, stride,
                                                       dilation, groups, self.attr, [], "")


def focus_as_conv(focus: Focus) -> nn.Conv2d:
    """The folded Focus stem as one 6×6 stride-2 convolution on the image itself (exact).

    Focus's 3×3 kernel over 2×2 pixel blocks reaches full-resolution offsets −2…3, so the same
    weights laid out on a 6×6 grid (padding 2) compute the same output without slicing the
    image into four and concatenating them (the largest copy in the network).
    """
    conv = focus.conv.conv
    weight = conv.weight.detach()
    cin = weight.shape[1] // 4
    full = torch.zeros(weight.shape[0], cin, 6, 6, dtype=weight.dtype, device=weight.device)
    for block, (dy, dx) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):  # Focus's TL, BL, TR, BR order
        full[:, :, dy::2, dx::2] = weight[:, block * cin:(block + 1) * cin]
    out = nn.Conv2d(cin, weight.shape[0], 6, 2, 2, bias=True).to(weight.device)
    out.weight.data.copy_(full)
    out.bias.data.copy_(conv.bias.detach())
    channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last)
    return out.to(memory_format=torch.channels_last) if channels_last else out


@torch.no_grad()
def fuse_conv_silu(model: nn.Module, example: torch.Tensor, atol: float = 1e-3) -> bool:
    """Replace every folded BaseConv by a :class:`FusedConv` (the Focus stem by one 6×6 convolution,
    the head's prediction convolutions too), in place, if the fused op exists and gives the same
    output on ``example`` (within ``atol``); otherwise leave the model as it was."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Focus) and isinstance(child.conv.bn, nn.Identity) and child.conv.conv.bias is not None:
                swaps.append((parent, name, child, FusedConv(focus_as_conv(child))))
            elif isinstance(child, BaseConv) and isinstance(child.bn, nn.Identity) and child.conv.bias is not None \
                    and not isinstance(parent, Focus):
                swaps.append((parent, name, child, FusedConv(child.conv)))
            elif isinstance(child, nn.Conv2d) and isinstance(parent, nn.ModuleList):  # the head's predictions
                swaps.append((parent, name, child, FusedConv(child, "none")))
    if not any(fused.attr == "swish" for *_, fused in swaps) or not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return False  # not folded (BatchNorm still there), or no such op in this torch
    reference = model(example)
    for parent, name, _, fused in swaps:
        setattr(parent, name, fused)
    try:
        if (model(example) - reference).abs().max().item() <= atol:
            return True
    except (RuntimeError, NotImplementedError):
        pass
    for parent, name, original, _ in swaps:
        setattr(parent, name, original)
    return False
