"""Weight lookup and safe loading.

A ``--weights`` value is either a path to a file or a known model name. Names resolve to a file
in ``$REIDX_MODEL_DIR`` (one or more folders separated by ``os.pathsep``) and then in
``~/.cache/reidx/models``. Known files are checked against their published sha256, so a
truncated download or a swapped file is caught before it produces wrong embeddings.

Loading never unpickles code: ``torch.load(..., weights_only=True)`` only rebuilds tensors and
plain containers, and a file holding a pickled model object is refused with a message that
says how to re-save it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path("~/.cache/reidx/models")
MODEL_DIR_ENV = "REIDX_MODEL_DIR"

_DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"
_YOLOX = "https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/{}.pth"


class WeightsError(RuntimeError):
    """A weights file could not be found, verified or loaded; the message says what to do."""


@dataclass(frozen=True)
class KnownModel:
    """A published weights file reidx knows by name."""

    name: str
    arch: str  # key of the architecture registry, e.g. "osnet_x0_25"
    filename: str
    url: str
    sha256: str | None = None  # None where we have not verified a copy ourselves


def _osnet_zoo() -> list[KnownModel]:
    # torchreid's model zoo, same-domain models (trained on the named dataset's train split).
    drive_ids = {
        ("osnet_x1_0", "market1501"): "1vduhq5DpN2q1g4fYEZfPI17MJeh9qyrA",
        ("osnet_x1_0", "dukemtmcreid"): "1QZO_4sNf4hdOKKKzKc-TZU9WW1v6zQbq",
        ("osnet_x1_0", "msmt17"): "112EMUfBPYeYg70w-syK6V6Mx8-Qb9Q1M",
        ("osnet_x0_75", "market1501"): "1ozRaDSQw_EQ8_93OUmjDbvLXw9TnfPer",
        ("osnet_x0_75", "dukemtmcreid"): "1IE3KRaTPp4OUa6PGTFL_d5_KQSJbP0Or",
        ("osnet_x0_75", "msmt17"): "1QEGO6WnJ-BmUzVPd3q9NoaO_GsPNlmWc",
        ("osnet_x0_5", "market1501"): "1PLB9rgqrUM7blWrg4QlprCuPT7ILYGKT",
        ("osnet_x0_5", "dukemtmcreid"): "1KoUVqmiST175hnkALg9XuTi1oYpqcyTu",
        ("osnet_x0_5", "msmt17"): "1UT3AxIaDvS2PdxzZmbkLmjtiqq7AIKCv",
        ("osnet_x0_25", "market1501"): "1z1UghYvOTtjx7kEoRfmqSMu-z62J6MAj",
        ("osnet_x0_25", "dukemtmcreid"): "1eumrtiXT4NOspjyEV4j8cHmlOaaCGk5l",
        ("osnet_x0_25", "msmt17"): "1sSwXSUlj4_tHZequ_iZ8w_Jh0VaRQMqF",
    }
    verified = {
        "osnet_x0_25_msmt17": "6f57607fed9f502b9efed546108132ee715df5a5b6e6932c6269bacb47f59f99",
        "osnet_x0_25_market1501": "c0ff09177a21417a19bc73bbf5af4eb5d2b097c2074ed35e67819ee6cd93612c",
    }
    out = []
    for (arch, data), drive_id in drive_ids.items():
        name = f"{arch}_{data}"
        out.append(KnownModel(name, arch, f"{name}.pth", _DRIVE.format(drive_id), verified.get(name)))
    return out


def _onnx_exports() -> list[KnownModel]:
    return [
        KnownModel(
            "osnet_x0_25_msmt17.onnx",
            "osnet_x0_25",
            "osnet_x0_25_msmt17.onnx",
            "no official download: see docs/models.md",
            "c61799fb79be8959f950590604c6d7a097c7c0aac7aca2baa49b09406ecb5829",
        ),
        KnownModel(
            "yolox_nano.onnx",
            "yolox_nano",
            "yolox_nano.onnx",
            "https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_nano.onnx",
            "e8af074932d4ed7e232278e3055cefcdea3edf178874a3694ae292649fb464dd",
        ),
    ]


def _yolox_zoo() -> list[KnownModel]:
    sizes = ["nano", "tiny", "s", "m", "l", "x"]
    return [KnownModel(f"yolox_{s}", f"yolox_{s}", f"yolox_{s}.pth", _YOLOX.format(f"yolox_{s}")) for s in sizes]


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in _osnet_zoo() + _onnx_exports() + _yolox_zoo()}


def search_dirs() -> list[Path]:
    """Folders searched for a model given by name, in order."""
    dirs = [Path(p).expanduser() for p in os.environ.get(MODEL_DIR_ENV, "").split(os.pathsep) if p]
    dirs.append(CACHE_DIR.expanduser())
    return dirs


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file on disk, with what we know about it."""

    path: Path
    sha256: str
    known: KnownModel | None  # the registry entry when the file was found by name

    @property
    def model_name(self) -> str:
        return self.known.name if self.known else self.path.stem


def _is_path_like(spec: str) -> bool:
    return os.sep in spec or "/" in spec or Path(spec).suffix in {".pth", ".pt", ".tar", ".onnx", ".ckpt"}


def resolve_weights(spec: str | os.PathLike, suffix: str = ".pth") -> ResolvedWeights:
    """Turn a ``--weights`` value into a verified file on disk.

    ``suffix`` picks the file format for a name (``.onnx`` for the ONNX backend). A name that
    is not found raises :class:`WeightsError` listing every folder searched and the official
    download address, because "file not found" alone sends the user hunting.
    """
    spec = os.fspath(spec)
    if Path(spec).expanduser().is_file():
        path = Path(spec).expanduser().resolve()
        check_weights_format(path)
        return ResolvedWeights(path, sha256_of(path), None)
    candidates = [spec] if suffix == ".pth" else [spec + suffix, spec]
    known = next((KNOWN_MODELS[c] for c in candidates if c in KNOWN_MODELS), None)
    if known is None:
        if _is_path_like(spec):
            raise WeightsError(f"weights file {spec!r} does not exist")
        names = sorted(n for n in KNOWN_MODELS if n.endswith(suffix) or "." not in n)
        raise WeightsError(f"unknown model name {spec!r}; give a file path or one of: {', '.join(names)}")
    dirs = search_dirs()
    for folder in dirs:
        candidate = folder / known.filename
        if candidate.is_file():
            digest = sha256_of(candidate)
            if known.sha256 and digest != known.sha256:
                raise WeightsError(
                    f"{candidate} does not match the published {known.name} weights "
                    f"(sha256 {digest}, expected {known.sha256}); the file is corrupt or a "
                    f"different model. Download it again from {known.url}"
                )
            if not known.sha256:  # unverified: at least make sure it is the kind of file its name says
                check_weights_format(candidate)
            return ResolvedWeights(candidate.resolve(), digest, known)
    looked = "\n".join(f"  - {d / known.filename}" for d in dirs)
    raise WeightsError(
        f"weights {known.name!r} not found. Looked in:\n{looked}\n"
        f"Download {known.filename} from {known.url} into one of these folders "
        f"(set ${MODEL_DIR_ENV} to add a folder), or pass a file path."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


RESAVE_STATE_DICT = "give a file saved with torch.save(model.state_dict(), path)"


def _check_torch_format(path: str | os.PathLike, remedy: str = RESAVE_STATE_DICT) -> None:
    """Refuse a file that is neither of torch.save's formats before torch.load sees it.

    torch.load on text or random bytes fails with KeyError: 101, IndexError or a misleading
    unpickling error; the first bytes tell: a zip archive (torch >= 1.6) or a pickle stream
    (protocol 2-5, the legacy format).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise WeightsError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return
    raise WeightsError(f"{path} is not a readable torch checkpoint (neither torch.save's zip format nor a "
                       f"pickle); {remedy}")


def load_onnx_model(path: str | os.PathLike, load_external_data: bool = True):
    """``onnx.load`` that turns a file which is not an ONNX model into one :class:`WeightsError`.

    onnx.load on random bytes raises protobuf's DecodeError, and bytes that happen to parse give
    an empty model that fails later with an IndexError: both are "not an ONNX model" here.
    """
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX files need the extra: pip install 'reidx[onnx]'") from None
    try:
        model = onnx.load(os.fspath(path), load_external_data=load_external_data)
    except OSError as exc:
        raise WeightsError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise WeightsError(f"{path} is not an ONNX model ({_first_line(exc)}); give a .onnx file "
                           f"exported with torch.onnx.export or a published export") from None
    if not (model.graph.node and model.graph.input and model.graph.output):
        raise WeightsError(f"{path} is not an ONNX model (it holds no graph); give a .onnx file "
                           f"exported with torch.onnx.export or a published export")
    return model


def check_weights_format(path: str | os.PathLike) -> None:
    """Fail early, with one clear :class:`WeightsError`, when a file is not what its suffix says.

    ``.onnx`` must parse as an ONNX model (checked when the onnx package is installed; without
    it the ONNX loaders say which extra to install); anything else must be a torch checkpoint.
    Checked where every loader resolves its weights, so no loader ever sees foreign bytes.
    """
    if Path(path).suffix.lower() == ".onnx":
        try:
            load_onnx_model(path, load_external_data=False)
        except ImportError:
            pass
    else:
        _check_torch_format(path)


def load_checkpoint(path: str | os.PathLike, remedy: str = RESAVE_STATE_DICT):
    """``torch.load`` of a checkpoint without executing pickled code: tensors and plain containers.
    ``remedy`` ends the error for a file that is not a torch checkpoint (what the user should do)."""
    import torch  # here, not at the top: commands that only resolve weights start fast

    _check_torch_format(path, remedy)
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Only "Unsupported global" means real pickled objects; any other unpickling failure is
        # a damaged or foreign file, and calling it "pickled objects" would send the user astray.
        lines = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        if not lines:
            raise WeightsError(f"{path} is not a readable torch checkpoint ({_first_line(exc)}); {remedy}") from None
        raise WeightsError(
            f"{path} holds pickled Python objects (for example a whole model saved with "
            f"torch.save(model)), which reidx refuses to load because unpickling can run "
            f"arbitrary code. Re-save only the tensors: torch.save(model.state_dict(), path). "
            f"({lines[0][:200]})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load on foreign bytes raises KeyError, IndexError, ...
        raise WeightsError(f"{path} is not a readable torch checkpoint ({_first_line(exc)}); {remedy}") from None


def state_dict_of(checkpoint, path: str | os.PathLike) -> dict:
    """A loaded checkpoint's tensors: a plain state dict, one nested under ``state_dict`` or
    ``model`` (torchreid and YOLOX training checkpoints), keys prefixed ``module.`` (DataParallel)."""
    import torch

    obj = checkpoint
    for nested in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(nested), dict):
            obj = obj[nested]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not contain a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict(path: str | os.PathLike) -> dict:
    """Load a checkpoint's tensors without executing pickled code (:func:`state_dict_of`)."""
    return state_dict_of(load_checkpoint(path), path)
