"""Person crops → L2-normalised ReID embeddings.

Preprocessing is torchreid's, so published OSNet weights give their published accuracy:
RGB, bilinear resize to 256×128 (H×W) with PIL, scale to [0, 1], ImageNet mean/std.

Two backends share that preprocessing, the weights and the :class:`Embedder` interface
(``build_embedder(backend="auto")`` picks onnxruntime on CPU when it is installed, else torch):

- ``torch``: our plain-torch OSNet. The fast path batches crops (32 is fastest on CPU),
  decodes the next batches in threads while one is embedded, and folds BatchNorm into the
  convolutions (features equal to fp32 eager within float rounding, tested). Channels-last
  memory is used on CUDA only: on CPU it measured no faster for OSNet's depthwise convolutions.
  bf16 autocast is opt-in (``precision="bf16"``), not the default: on this project's CPUs it
  measured ~1.4× faster but moved some crops' features to cosine 0.991 with fp32, below our
  0.999 bar (``benchmarks/embed.py`` prints both figures).
- ``onnx``: onnxruntime (extra ``onnx``) running either an ONNX export file or our OSNet
  exported in memory from a torch checkpoint; ~3× faster than torch on CPU for OSNet.

Output: ``float32`` array of shape (N, D), each row of unit length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from reidx.pipeline.boxes import INPUT_HEIGHT, INPUT_WIDTH, resize_crop  # noqa: F401 (resize_crop: embed's API too)
from reidx.pipeline.models.registry import load_model
from reidx.pipeline.models.weights import resolve_weights
from reidx.pipeline.runtime import import_onnx, make_dims_symbolic, onnx_session, onnxruntime_available, resolve_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCH_SIZE = 32  # crops per forward pass: fastest on CPU among 8-64


def to_input_tensor(crops: np.ndarray) -> torch.Tensor:
    """uint8 batch (N, 256, 128, 3) → normalised float32 (N, 3, 256, 128)."""
    x = torch.from_numpy(np.array(crops, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class EmbedderInfo:
    """What produced an embedding; stored beside every vector so galleries never mix models."""

    name: str  # model name, e.g. "osnet_x0_25_msmt17"
    weights_sha256: str
    dim: int
    backend: str  # "torch" or "onnx"

    @property
    def id(self) -> str:
        return f"{self.name}@{self.weights_sha256[:12]}"


class Embedder:
    """Common interface: ``embed(crops)`` with crops a uint8 array (N, 256, 128, 3)."""

    info: EmbedderInfo

    def embed(self, crops: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def embed_batches(self, crops: list[np.ndarray]) -> np.ndarray:
        """Any number of (256, 128, 3) crops, BATCH_SIZE per forward pass → (N, dim) unit features."""
        if not crops:
            return np.zeros((0, self.info.dim), np.float32)
        return np.concatenate([self.embed(np.stack(crops[i:i + BATCH_SIZE])) for i in range(0, len(crops), BATCH_SIZE)])


class TorchEmbedder(Embedder):
    """OSNet in torch. ``precision``: ``fp32`` (default) or ``bf16`` autocast (faster, less exact)."""

    def __init__(self, weights: str = "osnet_x0_25_msmt17", device: str = "auto", precision: str = "fp32",
                 fast: bool = True):
        loaded = load_model(weights, "osnet", fold=fast)  # an ONNX export runs in our torch model too
        model, resolved, feature_dim = loaded.module, loaded.resolved, loaded.output_dim
        self.device = resolve_device(device)
        self.channels_last = fast and self.device.type == "cuda"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
        self.precision = precision
        self.info = EmbedderInfo(resolved.model_name, resolved.sha256, feature_dim, "torch")

    @torch.inference_mode()
    def embed(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.info.dim), np.float32)
        x = to_input_tensor(crops).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            features = self.model(x)
        return l2_normalise(features.float().cpu().numpy())


class OnnxEmbedder(Embedder):
    """The model run by onnxruntime (extra ``onnx``): an ONNX export as it is, or our OSNet
    exported in memory from a torch checkpoint. On CPU this runs OSNet's depthwise
    convolutions ~3× faster than torch does (``benchmarks/embed.py``), with the same features.
    """

    def __init__(self, weights: str = "osnet_x0_25_msmt17", device: str = "auto", threads: int | None = None):
        onnx, _ = import_onnx("the onnx backend")
        resolved = resolve_weights(weights, ".pth")
        if resolved.path.suffix == ".onnx":
            graph = onnx.load(str(resolved.path))
            dim = graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value or 512
            # exports fix the batch to 1 in inputs, outputs and the flatten Reshape's [1, -1]
            graph_bytes = make_dims_symbolic(graph, {0: "batch"}, {0: "batch"}, lambda shape: True)
        else:
            torch_embedder = TorchEmbedder(weights, device="cpu")
            dim = torch_embedder.info.dim
            graph_bytes = export_onnx(torch_embedder.model)
        self.session = onnx_session(graph_bytes, device, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.info = EmbedderInfo(resolved.model_name.removesuffix(".onnx"), resolved.sha256, dim, "onnx")

    def embed(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.info.dim), np.float32)
        x = to_input_tensor(crops).contiguous().numpy()
        (features,) = self.session.run(None, {self.input_name: x})
        return l2_normalise(features)


def export_onnx(model: torch.nn.Module) -> bytes:
    """Export a (BatchNorm-folded) embedding model to ONNX bytes with a dynamic batch."""
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(model.cpu().eval(), torch.zeros(1, 3, INPUT_HEIGHT, INPUT_WIDTH), buffer, dynamo=False,
                          input_names=["images"], output_names=["features"], opset_version=17,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    return buffer.getvalue()


def build_embedder(weights: str, backend: str = "auto", device: str = "auto", precision: str = "fp32",
                   threads: int | None = None) -> Embedder:
    """``auto``: onnxruntime on CPU when installed (fastest there), else torch; bf16 needs torch.

    ``threads`` caps the CPU threads of this embedder (torch's are per process).
    """
    if threads:
        torch.set_num_threads(threads)
    if backend == "auto":
        cpu = resolve_device(device).type == "cpu"
        backend = "onnx" if cpu and precision == "fp32" and onnxruntime_available() else "torch"
    if backend == "torch":
        return TorchEmbedder(weights, device=device, precision=precision)
    if backend == "onnx":
        return OnnxEmbedder(weights, device=device, threads=threads)
    raise ValueError(f"unknown backend {backend!r}; use torch or onnx")
