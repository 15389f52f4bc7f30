"""OSNet (Zhou et al., "Omni-Scale Feature Learning for Person Re-Identification", ICCV 2019).

Plain torch, module names identical to torchreid's so its checkpoints load strictly. Only the
feature path is built: the identity classifier of a training checkpoint is not needed to embed
(training adds its own, sized to its identities).

In eval mode ``forward`` returns the 512-d ``fc`` output before normalisation, as torchreid's
feature extractor does. :func:`fold_batchnorm` folds every BatchNorm into the convolution or
linear layer before it, for inference only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# width multiplier -> stage channels, as published
OSNET_CHANNELS = {
    "osnet_x1_0": (64, 256, 384, 512),
    "osnet_x0_75": (48, 192, 288, 384),
    "osnet_x0_5": (32, 128, 192, 256),
    "osnet_x0_25": (16, 64, 96, 128),
    "osnet_ibn_x1_0": (64, 256, 384, 512),
}


class ConvLayer(nn.Module):
    """k×k convolution + BatchNorm (or InstanceNorm in the IBN variant) + ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, groups=1, instance_norm=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False, groups=groups)
        self.bn = nn.InstanceNorm2d(cout, affine=True) if instance_norm else nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Conv1x1(ConvLayer):
    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__(cin, cout, 1, stride=stride, groups=groups)


class Conv1x1Linear(nn.Module):
    """1×1 convolution + BatchNorm, no activation (block output and shortcut)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class LightConv3x3(nn.Module):
    """Pointwise 1×1 then depthwise 3×3 convolution, BatchNorm, ReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False, groups=cout)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv2(self.conv1(x))))


class ChannelGate(nn.Module):
    """Aggregation gate shared by all streams of a block: squeeze, two 1×1 convs, sigmoid."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=True)
        self.gate_activation = nn.Sigmoid()

    def forward(self, x):
        g = self.gate_activation(self.fc2(self.relu(self.fc1(self.global_avgpool(x)))))
        return x * g


class OSBlock(nn.Module):
    """Omni-scale residual block: four streams of 1–4 stacked light 3×3 convs, gated and summed."""

    def __init__(self, cin, cout, instance_norm=False, bottleneck_reduction=4):
        super().__init__()
        mid = cout // bottleneck_reduction
        self.conv1 = Conv1x1(cin, mid)
        self.conv2a = LightConv3x3(mid, mid)
        self.conv2b = nn.Sequential(*[LightConv3x3(mid, mid) for _ in range(2)])
        self.conv2c = nn.Sequential(*[LightConv3x3(mid, mid) for _ in range(3)])
        self.conv2d = nn.Sequential(*[LightConv3x3(mid, mid) for _ in range(4)])
        self.gate = ChannelGate(mid)
        self.conv3 = Conv1x1Linear(mid, cout)
        self.downsample = Conv1x1Linear(cin, cout) if cin != cout else None
        self.IN = nn.InstanceNorm2d(cout, affine=True) if instance_norm else None

    def forward(self, x):
        x1 = self.conv1(x)
        # streams first, then the shared gate: the published call order, which ONNX exports follow
        streams = [self.conv2a(x1), self.conv2b(x1), self.conv2c(x1), self.conv2d(x1)]
        x2 = sum(self.gate(s) for s in streams)
        x3 = self.conv3(x2)
        identity = x if self.downsample is None else self.downsample(x)
        out = x3 + identity
        if self.IN is not None:
            out = self.IN(out)
        return F.relu(out)


class OSNet(nn.Module):
    """OSNet feature extractor: image batch (N, 3, 256, 128) → (N, feature_dim) features."""

    def __init__(self, channels=(64, 256, 384, 512), layers=(2, 2, 2), feature_dim=512, instance_norm=False):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.feature_dim = feature_dim
        self.conv1 = ConvLayer(3, c0, 7, stride=2, padding=3, instance_norm=instance_norm)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = self._make_stage(layers[0], c0, c1, reduce_spatial_size=True, instance_norm=instance_norm)
        self.conv3 = self._make_stage(layers[1], c1, c2, reduce_spatial_size=True)
        self.conv4 = self._make_stage(layers[2], c2, c3, reduce_spatial_size=False)
        self.conv5 = Conv1x1(c3, c3)
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c3, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True))
        self._init_params()

    @staticmethod
    def _make_stage(num_blocks, cin, cout, reduce_spatial_size, instance_norm=False):
        blocks = [OSBlock(cin, cout, instance_norm=instance_norm)]
        blocks += [OSBlock(cout, cout, instance_norm=instance_norm) for _ in range(1, num_blocks)]
        if reduce_spatial_size:
            blocks.append(nn.Sequential(Conv1x1(cout, cout), nn.AvgPool2d(2, stride=2)))
        return nn.Sequential(*blocks)

    def _init_params(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.InstanceNorm2d)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def featuremaps(self, x):
        x = self.maxpool(self.conv1(x))
        return self.conv5(self.conv4(self.conv3(self.conv2(x))))

    def forward(self, x):
        v = self.global_avgpool(self.featuremaps(x)).flatten(1)
        return self.fc(v)


def build_osnet(arch: str, feature_dim: int = 512) -> OSNet:
    if arch not in OSNET_CHANNELS:
        raise ValueError(f"unknown OSNet architecture {arch!r}; known: {', '.join(OSNET_CHANNELS)}")
    return OSNet(OSNET_CHANNELS[arch], feature_dim=feature_dim, instance_norm=arch.startswith("osnet_ibn"))


def infer_osnet_arch(state_dict: dict[str, torch.Tensor]) -> str:
    """Guess the OSNet width (and IBN variant) from a checkpoint's tensor shapes."""
    try:
        c0 = state_dict["conv1.conv.weight"].shape[0]
    except KeyError:
        raise ValueError("not an OSNet checkpoint: no 'conv1.conv.weight'") from None
    # InstanceNorm layers carry no running statistics, BatchNorm layers do.
    ibn = "conv1.bn.weight" in state_dict and "conv1.bn.running_mean" not in state_dict
    for arch, channels in OSNET_CHANNELS.items():
        if channels[0] == c0 and arch.startswith("osnet_ibn") == ibn:
            return arch
    raise ValueError(f"no OSNet width has {c0} stem channels")


def load_osnet_state(model: OSNet, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a torchreid checkpoint strictly, ignoring only the training classifier."""
    features = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
    try:
        result = model.load_state_dict(features, strict=False)
    except RuntimeError as exc:  # shape mismatches: a checkpoint of another width
        raise ValueError(f"checkpoint does not match the OSNet architecture: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            "checkpoint does not match the OSNet architecture: "
            f"missing {result.missing_keys[:5]}{'…' if len(result.missing_keys) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'…' if len(result.unexpected_keys) > 5 else ''}"
        )


def _folded(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d):
    """Return a copy of ``layer`` with ``bn`` (in eval mode) folded into its weight and bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    if isinstance(layer, nn.Conv2d):
        fused = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, layer.groups, bias=True)
    else:
        fused = nn.Linear(layer.in_features, layer.out_features, bias=True)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    fused.weight.copy_(layer.weight * scale.reshape(shape))
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


@torch.no_grad()
def fold_batchnorm(model: OSNet) -> OSNet:
    """Fold each BatchNorm into the layer before it, in place (inference only; idempotent).

    Saves a full memory pass per layer; features change by float rounding only (tested).
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, (ConvLayer, Conv1x1Linear)) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = _folded(module.conv, module.bn)
            module.bn = nn.Identity()
        elif isinstance(module, LightConv3x3) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv2 = _folded(module.conv2, module.bn)
            module.bn = nn.Identity()
    linear, bn = model.fc[0], model.fc[1]
    if isinstance(bn, nn.BatchNorm1d):
        model.fc[0] = _folded(linear, bn)
        model.fc[1] = nn.Identity()
    return model
