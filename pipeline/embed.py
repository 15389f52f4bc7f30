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

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from reidx.pipeline.imaging import DEFAULT_MAX_PIXELS, load_image_or_reason
from reidx.pipeline.models.osnet import build_osnet, fold_batchnorm, infer_osnet_arch, load_osnet_state
from reidx.pipeline.models.weights import load_state_dict, resolve_weights

INPUT_HEIGHT, INPUT_WIDTH = 256, 128
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCH_SIZE = 32  # crops per forward pass: fastest on CPU among 8-64


def resize_crop(image: Image.Image) -> np.ndarray:
    """An RGB crop resized as torchreid does (PIL bilinear) → uint8 array (256, 128, 3)."""
    if image.size != (INPUT_WIDTH, INPUT_HEIGHT):
        image = image.resize((INPUT_WIDTH, INPUT_HEIGHT), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def to_input_tensor(crops: np.ndarray) -> torch.Tensor:
    """uint8 batch (N, 256, 128, 3) → normalised float32 (N, 3, 256, 128)."""
    x = torch.from_numpy(np.array(crops, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


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


class TorchEmbedder(Embedder):
    """OSNet in torch. ``precision``: ``fp32`` (default) or ``bf16`` autocast (faster, less exact)."""

    def __init__(self, weights: str = "osnet_x0_25_msmt17", device: str = "auto", precision: str = "fp32",
                 fast: bool = True):
        resolved = resolve_weights(weights, ".pth")
        if resolved.path.suffix == ".onnx":
            # An ONNX export runs in our torch model too: same features, our fast path and devices.
            from reidx.pipeline.models.onnx_import import load_onnx_weights

            arch, feature_dim = (resolved.known.arch if resolved.known else "osnet_x0_25"), 512
            example = torch.zeros(1, 3, INPUT_HEIGHT, INPUT_WIDTH)
            model = load_onnx_weights(build_osnet(arch), resolved.path, example, fold_batchnorm)
            # (an unknown export is assumed x0_25; a wrong width fails the shape check loudly)
        else:
            state = load_state_dict(resolved.path)
            arch = resolved.known.arch if resolved.known else infer_osnet_arch(state)
            feature_dim = state["fc.0.weight"].shape[0] if "fc.0.weight" in state else 512
            model = build_osnet(arch, feature_dim=feature_dim)
            load_osnet_state(model, state)
        model.eval()
        self.device = resolve_device(device)
        if fast:
            fold_batchnorm(model)
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
        try:
            import onnx
            import onnxruntime as ort
        except ImportError:
            raise ImportError("the onnx backend needs the extra: pip install 'reidx[onnx]'") from None
        resolved = resolve_weights(weights, ".pth")
        if resolved.path.suffix == ".onnx":
            graph = onnx.load(os.fspath(resolved.path))
            make_batch_dynamic(graph)
            dim = graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value or 512
            graph_bytes = graph.SerializeToString()
        else:
            torch_embedder = TorchEmbedder(weights, device="cpu")
            dim = torch_embedder.info.dim
            graph_bytes = export_onnx(torch_embedder.model)
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads  # several worker processes must not oversubscribe
        self.session = ort.InferenceSession(graph_bytes, options, providers=providers)
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


def make_batch_dynamic(graph) -> None:
    """Let an ONNX export traced at batch 1 run whole batches.

    Exports fix the batch dimension to 1 in the graph's inputs and outputs and in the shape
    constant of the flatten ``Reshape`` ([1, -1]); a symbolic batch and a 0 there ("copy the
    input's dimension", ONNX Reshape semantics) make it batch-agnostic.
    """
    from onnx import numpy_helper

    for value in list(graph.graph.input) + list(graph.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    initializers = {init.name: init for init in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Reshape" and node.input[1] in initializers:
            shape = numpy_helper.to_array(initializers[node.input[1]]).copy()
            if shape.size and shape[0] == 1:
                shape[0] = 0
                initializers[node.input[1]].CopyFrom(numpy_helper.from_array(shape, node.input[1]))


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


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


def _load_crop(path, max_pixels: int):
    image, reason = load_image_or_reason(path, max_pixels)
    return (None, reason) if image is None else (resize_crop(image), None)


@dataclass
class EmbeddedFiles:
    """Result of :func:`embed_files`: one entry per input path, in input order."""

    embeddings: np.ndarray  # (N, D) float32; rows of failed images are NaN
    errors: list[str | None]  # None where the image embedded, else why it did not

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def embed_files(embedder: Embedder, paths: Sequence, batch_size: int = BATCH_SIZE, decode_workers: int = 2,
                max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False) -> EmbeddedFiles:
    """Embed image files in batches, decoding the next batches in threads while one is embedded.

    A file that cannot be decoded gets a NaN row and its reason; it never stops the run.
    """
    from tqdm import tqdm

    dim = embedder.info.dim
    out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    errors: list[str | None] = [None] * len(paths)
    bar = tqdm(total=len(paths), unit="img", desc="embed", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, decode_workers)) as pool:
        pending: deque = deque()
        batch_iter = enumerate(_batches(paths, batch_size))

        def submit_next() -> None:
            nxt = next(batch_iter, None)
            if nxt is not None:
                index, chunk = nxt
                pending.append((index, pool.map(_load_crop, chunk, [max_pixels] * len(chunk))))

        for _ in range(2):  # keep two batches decoding ahead of the model
            submit_next()
        while pending:
            index, loaded = pending.popleft()
            loaded = list(loaded)
            submit_next()
            start = index * batch_size
            good = [i for i, (crop, _) in enumerate(loaded) if crop is not None]
            for i, (_, err) in enumerate(loaded):
                errors[start + i] = err
            if good:
                features = embedder.embed(np.stack([loaded[i][0] for i in good]))
                out[[start + i for i in good]] = features
            bar.update(len(loaded))
    bar.close()
    return EmbeddedFiles(out, errors)
