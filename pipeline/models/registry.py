"""The model registry: weights (a known name or a file) → a ready torch module, for every user.

In the manner of torchreid's ``build_model(name)`` and fast-reid's registries, one table maps a
model family to how its modules are built, how an architecture is read off a checkpoint, how a
checkpoint is loaded and how an ONNX export's weights are brought into our module. The
embedder, the detector and training all load through :func:`load_model`, so adding a backbone
touches this file and the model's own module only.

Families:

- ``osnet`` (ReID embedders; input RGB 256×128, ImageNet mean/std: :mod:`reidx.pipeline.embed`)
- ``yolox`` (person detector; input BGR 0–255 letterboxed: :mod:`reidx.pipeline.detect`)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from reidx.pipeline.models.weights import ResolvedWeights, load_checkpoint, resolve_weights, state_dict_of

GATE_KEY = "domain_gate"  # a fine-tuned OSNet's gate entry (pipeline.models.domain_gate)
OSNET_INPUT_HW = (256, 128)  # torchreid's training size; the published weights expect it


@dataclass
class LoadedModel:
    """A model ready for inference or fine-tuning, with what it is."""

    module: Any  # torch.nn.Module in eval mode, on the CPU
    arch: str  # registry architecture, e.g. "osnet_x0_25" or "yolox_nano"
    resolved: ResolvedWeights
    output_dim: int  # OSNet: feature dimension; YOLOX: number of classes
    folded: bool  # BatchNorm already folded into the convolutions (ONNX exports are)


@dataclass(frozen=True)
class Family:
    from_state: Callable[[dict, str | None], tuple[Any, str, int]]  # (state, known arch) → (module, arch, dim)
    from_onnx: Callable[[ResolvedWeights], tuple[Any, str, int]]
    fold: Callable[[Any], Any]


def _osnet_from_state(state: dict, arch: str | None):
    from reidx.pipeline.models.osnet import build_osnet, infer_osnet_arch, load_osnet_state

    arch = arch or infer_osnet_arch(state)
    feature_dim = state["fc.0.weight"].shape[0] if "fc.0.weight" in state else 512
    model = build_osnet(arch, feature_dim=feature_dim)
    load_osnet_state(model, state)
    return model, arch, feature_dim


def _osnet_from_onnx(resolved: ResolvedWeights):
    import torch

    from reidx.pipeline.models.onnx_import import load_onnx_weights
    from reidx.pipeline.models.osnet import build_osnet, fold_batchnorm

    # an unknown export is assumed x0_25; a wrong width fails load_onnx_weights' shape check loudly
    arch = resolved.known.arch if resolved.known else "osnet_x0_25"
    example = torch.zeros(1, 3, *OSNET_INPUT_HW)
    return load_onnx_weights(build_osnet(arch), resolved.path, example, fold_batchnorm), arch, 512


def _osnet_fold(model):
    from reidx.pipeline.models.domain_gate import DomainGatedOSNet
    from reidx.pipeline.models.osnet import fold_batchnorm

    if isinstance(model, DomainGatedOSNet):
        fold_batchnorm(model.base)
        fold_batchnorm(model.tuned)
        return model
    return fold_batchnorm(model)


def _yolox_from_state(state: dict, arch: str | None):
    from reidx.pipeline.models.yolox import build_yolox, infer_yolox_size, load_yolox_state

    arch = arch or infer_yolox_size(state)
    num_classes = state["head.cls_preds.0.weight"].shape[0]
    model = build_yolox(arch, num_classes)
    load_yolox_state(model, state)
    return model, arch, num_classes


def _yolox_from_onnx(resolved: ResolvedWeights):
    from reidx.pipeline.models.yolox_onnx import infer_onnx_size, load_yolox_onnx

    arch = infer_onnx_size(resolved.path)
    return load_yolox_onnx(resolved.path, arch), arch, 80


def _yolox_fold(model):
    from reidx.pipeline.models.yolox import fold_batchnorm

    return fold_batchnorm(model)


FAMILIES: dict[str, Family] = {
    "osnet": Family(_osnet_from_state, _osnet_from_onnx, _osnet_fold),
    "yolox": Family(_yolox_from_state, _yolox_from_onnx, _yolox_fold),
}


def load_model(weights: str | ResolvedWeights, family: str, fold: bool = False, allow_onnx: bool = True,
               domain_gate: bool = True) -> LoadedModel:
    """Build the ``family`` module holding ``weights`` (eval mode, CPU).

    ``.pth`` checkpoints load strictly (training classifiers ignored); ``.onnx`` exports have
    their BatchNorm folded already, so they come back folded and cannot be fine-tuned
    (``allow_onnx=False`` says so). ``fold`` folds a checkpoint's BatchNorm for inference.
    A fine-tuned OSNet with a domain gate (:mod:`.domain_gate`) comes back gated, or as the
    tuned network alone with ``domain_gate=False`` (what training starts from).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    resolved = weights if isinstance(weights, ResolvedWeights) else resolve_weights(weights, ".pth")
    if resolved.path.suffix == ".onnx":
        if not allow_onnx:
            raise ValueError(f"{resolved.path}: training starts from a torch checkpoint (.pth), not an ONNX "
                             f"export (its BatchNorm is folded away)")
        module, arch, dim = spec.from_onnx(resolved)
        return LoadedModel(module.eval(), arch, resolved, dim, folded=True)
    checkpoint = load_checkpoint(resolved.path)
    state = state_dict_of(checkpoint, resolved.path)
    module, arch, dim = spec.from_state(state, resolved.known.arch if resolved.known else None)
    gate = checkpoint.get(GATE_KEY) if isinstance(checkpoint, dict) and family == "osnet" and domain_gate else None
    if gate is not None:
        from reidx.pipeline.models.domain_gate import from_checkpoint

        module = from_checkpoint(module, gate, lambda base_state: spec.from_state(base_state, arch)[::2], dim,
                                 resolved.path)
    module.eval()
    if fold:
        module = spec.fold(module)
    return LoadedModel(module, arch, resolved, dim, folded=fold)
