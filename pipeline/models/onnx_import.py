"""Load the weights of an ONNX export into our plain-torch modules.

Exports usually fold BatchNorm into the convolution before it and rename those weights
(``onnx::Conv_1050``), so names cannot be matched. Convolutions can: the export traces the
model, so its Conv nodes appear in the order the torch model calls its ``Conv2d`` modules
(a module called several times, like OSNet's shared channel gate, appears once per call with
the same weights). We pair unique ONNX convolution weights with unique ``Conv2d`` modules in
call order, check every shape, and copy weight and bias into a model whose BatchNorms are
already folded away. Initializers that keep their torch names (unfolded layers) load by name.

Needs the ``onnx`` package (extra ``reidx[onnx]``), imported only here.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn


def _read_graph(path: str | os.PathLike):
    from reidx.pipeline.runtime import import_onnx

    onnx, numpy_helper = import_onnx("importing ONNX weights")
    graph = onnx.load(os.fspath(path)).graph
    return graph, {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in graph.initializer}


def conv_modules_in_call_order(model: nn.Module, example: torch.Tensor) -> list[nn.Conv2d]:
    """Each ``Conv2d`` of ``model`` once, in the order a forward pass first calls it."""
    order: list[nn.Conv2d] = []
    hooks = [m.register_forward_pre_hook(lambda m, _: order.append(m) if m not in order else None)
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order


@torch.no_grad()
def load_onnx_weights(model: nn.Module, path: str | os.PathLike, example: torch.Tensor,
                      fold: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Fill ``model`` with the weights of the ONNX export at ``path``; returns the folded model.

    ``fold`` removes the model's BatchNorms (as the export did); ``example`` is an input of the
    export's shape, used once to record the call order of convolutions.
    """
    graph, weights = _read_graph(path)
    model.eval()
    own = model.state_dict()
    by_name = {name: tensor for name, tensor in weights.items() if name in own and own[name].shape == tensor.shape}
    model.load_state_dict(by_name, strict=False)  # unfolded layers (e.g. a Linear + BatchNorm1d head)
    model = fold(model)

    onnx_convs, seen = [], set()
    for node in graph.node:
        if node.op_type == "Conv" and node.input[1] not in seen:
            seen.add(node.input[1])
            onnx_convs.append((node.input[1], node.input[2] if len(node.input) > 2 else None))
    torch_convs = conv_modules_in_call_order(model, example)
    if len(onnx_convs) != len(torch_convs):
        raise ValueError(f"{path}: the export has {len(onnx_convs)} convolutions, the model {len(torch_convs)}")
    for index, ((weight_name, bias_name), conv) in enumerate(zip(onnx_convs, torch_convs)):
        weight = weights[weight_name]
        if weight.shape != conv.weight.shape:
            raise ValueError(f"{path}: convolution {index} ({weight_name}) has shape {tuple(weight.shape)}, "
                             f"the model expects {tuple(conv.weight.shape)}")
        conv.weight.copy_(weight)
        if bias_name is not None:
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
            conv.bias.copy_(weights[bias_name])
        elif conv.bias is not None:
            conv.bias.zero_()
    return model
