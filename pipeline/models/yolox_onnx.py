"""YOLOX ONNX exports: their weights in our torch model, or the graph run by onnxruntime.

The official export (``yolox_nano.onnx``: opset 11, input ``images`` 1×3×416×416, raw head
output 1×3549×85, BatchNorm folded, weights renamed ``onnx::Conv_N``) is read two ways:

- :func:`load_yolox_onnx` copies its convolution weights into :class:`~pipeline.models.yolox.YOLOX`
  (matched in call order by :mod:`pipeline.models.onnx_import`, every shape checked), so the
  same weights run in torch at any input size, batched, on CUDA.
- :class:`OnnxYOLOX` runs the graph itself in onnxruntime, after :func:`dynamic_graph` has made
  batch, height and width symbolic (the export fixes them; only the three flatten ``Reshape``
  shapes ``[1, 85, -1]`` depend on them, and ``0`` there means "copy the input's dimension").

Needs the ``onnx`` package (extra ``reidx[onnx]``), imported only here.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from reidx.pipeline.models.yolox import YOLOX_SIZES, build_yolox, fold_batchnorm
from reidx.pipeline.runtime import import_onnx, make_dims_symbolic, onnx_session


def _onnx():
    return import_onnx("YOLOX ONNX files")


def graph_input_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(height, width) the export was traced at, or None where they are symbolic."""
    onnx, _ = _onnx()
    dims = onnx.load(os.fspath(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    height, width = dims[2].dim_value, dims[3].dim_value
    return (height, width) if height and width else None


def infer_onnx_size(path: str | os.PathLike) -> str:
    """The YOLOX size of an export, from its stem width and whether it has depthwise convolutions."""
    onnx, numpy_helper = _onnx()
    graph = onnx.load(os.fspath(path)).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    stem_width = shapes[convs[0].input[1]][0] / 64
    depthwise = any(attr.name == "group" and attr.i > 1 for node in convs for attr in node.attribute)
    for name, (_, width, dw) in YOLOX_SIZES.items():
        if abs(width - stem_width) < 1e-6 and dw == depthwise:
            return name
    raise ValueError(f"{path}: stem width {stem_width:.3f} (depthwise {depthwise}) matches no YOLOX size")


def load_yolox_onnx(path: str | os.PathLike, size: str | None = None, num_classes: int = 80):
    """A BatchNorm-folded :class:`YOLOX` holding the export's weights (eval mode, CPU)."""
    from reidx.pipeline.models.onnx_import import load_onnx_weights

    size = size or infer_onnx_size(path)
    height, width = graph_input_size(path) or (416, 416)
    example = torch.zeros(1, 3, height, width)
    model = load_onnx_weights(build_yolox(size, num_classes), path, example, fold_batchnorm)
    return model.eval()


def dynamic_graph(path: str | os.PathLike) -> bytes:
    """The export with symbolic batch, height and width, serialised for onnxruntime."""
    onnx, _ = _onnx()
    return make_dims_symbolic(onnx.load(os.fspath(path)), {0: "batch", 2: "height", 3: "width"},
                              {0: "batch", 1: "anchors"}, lambda shape: shape.size == 3 and shape[2] == -1)


class OnnxYOLOX:
    """onnxruntime session over an export made shape-agnostic; ``__call__`` maps (N,3,H,W) → raw output."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        self.session = onnx_session(dynamic_graph(path), device, threads or torch.get_num_threads())
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().float().contiguous().numpy()
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]
