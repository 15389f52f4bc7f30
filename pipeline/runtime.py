"""Devices and inference runtimes: which device a model runs on, onnxruntime sessions, and the
one piece of ONNX graph surgery both our exports need.

Kept apart from the models so that the embedder, the detector and training agree on what
``--device auto`` means and open onnxruntime the same way. torch, onnx and onnxruntime are
imported inside the functions: commands that never run a model never pay for them.
"""

from __future__ import annotations

from typing import Callable


def resolve_device(device: str):
    """``auto`` → CUDA when torch sees a GPU, else CPU; ``cuda`` without one is an error, not a silent CPU run."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def import_onnx(purpose: str):
    """(onnx, numpy_helper), or an ImportError that names the extra to install."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError(f"{purpose} needs the extra: pip install 'reidx[onnx]'") from None
    return onnx, numpy_helper


def onnx_session(graph: bytes, device: str = "cpu", threads: int | None = None):
    """An onnxruntime session with full graph optimisation; CUDA first when asked and available.

    ``threads`` caps intra-op threads: several Dask worker processes on one machine must not
    oversubscribe its cores.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("the onnx backend needs the extra: pip install 'reidx[onnx]'") from None
    providers = ["CPUExecutionProvider"]
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(graph, options, providers=providers)


def make_dims_symbolic(model, input_dims: dict[int, str], output_dims: dict[int, str],
                       batch_reshape: Callable) -> bytes:
    """Let an export traced at one batch (and size) run any: name the given input/output dims,
    and in each ``Reshape`` whose constant shape ``batch_reshape(shape)`` accepts, replace the
    leading 1 by 0 ("copy the input's dimension", ONNX Reshape semantics). Returns the bytes."""
    _, numpy_helper = import_onnx("ONNX graph surgery")
    graph = model.graph
    for index, name in input_dims.items():
        graph.input[0].type.tensor_type.shape.dim[index].dim_param = name
    for index, name in output_dims.items():
        graph.output[0].type.tensor_type.shape.dim[index].dim_param = name
    del graph.value_info[:]  # shapes inferred at trace time would contradict the new ones
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[1] in initializers:
            shape = numpy_helper.to_array(initializers[node.input[1]]).copy()
            if shape.size and shape[0] == 1 and batch_reshape(shape):
                shape[0] = 0
                initializers[node.input[1]].CopyFrom(numpy_helper.from_array(shape, node.input[1]))
    return model.SerializeToString()
