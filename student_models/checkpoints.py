"""Checkpoints: the official files we know, fetching and verifying them, and strict loading.

A checkpoint argument is either a path or the name of a known official checkpoint. Known
names resolve to a file in the cache directory (``$TORCH_HOME/hub/checkpoints``), downloaded
with a progress bar when the network allows. A known file, wherever it lies, is verified by its
published size (before hashing, so a truncated 2.5 GB download fails at once) and its full
SHA-256, which is remembered per file version (`student_models.hashing`) so a teacher is hashed
once, not on every run and rank. Loading never unpickles Python objects (``weights_only=True``),
says what is wrong with a file that cannot be read (not a checkpoint, truncated, or pickled code),
and fails on any missing, unexpected or mis-shaped key.

Checkpoints written by this project are dicts with ``format == CHECKPOINT_FORMAT`` that carry
the registered model name and its encoder config, so they can be rebuilt by name alone
(`student_models.build.load_sam`). This module builds on the registry, never the reverse.

What lives here: the float model's file format and the file primitives the stages share
(`load_torch_file`, `load_state_dict_strict`, `atomic_torch_save`), so that float and quantized files
are written and refused alike. What does not: the quantized format (`quantize.checkpoint`), whose
loading rebuilds quantize's layers, and distill's resumable training state (``<out>/checkpoints/last.pt``:
`distill.steps` writes it with `atomic_torch_save`, `distill.run_folder.read_state` reads it). They
live with their stage because `student_models` imports no stage (student_models <- distill, quantize,
hierarchical <- benchmarks).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from student_models.extras import MissingExtraError
from student_models.hashing import sha256_file
from student_models.registry import build_architecture, canonical_name, get_spec, list_models

CHECKPOINT_FORMAT = "sam-compress/checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read, verified or matched to the model."""


@dataclass(frozen=True)
class KnownCheckpoint:
    model: str
    filename: str
    url: str
    sha256: str | None  # full hex digest; None where none is published
    size: int | None = None  # bytes; None where none is published
    loadable: bool = True
    note: str = ""


# SHA-256 and sizes: ../shared/docs/SPEC.md section 1, which records the values published for these
# files; the sizes of vit_l and mobile_sam are those of the same files in independent public
# download manifests. SAM's file-name suffix (4b8939...) is the start of the file's MD5, not of its
# SHA-256. TinySAM's releases publish no hash, so its files are loaded unverified (keys still strict).
KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {
    "sam_vit_h_4b8939": KnownCheckpoint(
        "vit_h",
        "sam_vit_h_4b8939.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2_564_550_879,
    ),
    "sam_vit_l_0b3195": KnownCheckpoint(
        "vit_l",
        "sam_vit_l_0b3195.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1_249_524_607,
    ),
    "sam_vit_b_01ec64": KnownCheckpoint(
        "vit_b",
        "sam_vit_b_01ec64.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
    ),
    "mobile_sam": KnownCheckpoint(
        "tinyvit_5m",
        "mobile_sam.pt",
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        40_728_226,
    ),
    "tinysam_42.3": KnownCheckpoint(
        "tinyvit_5m",
        "tinysam_42.3.pth",
        "https://github.com/xinghaochen/TinySAM/releases/download/3.0/tinysam_42.3.pth",
        None,
    ),
    "tinysam_w8a8": KnownCheckpoint(
        "tinyvit_5m",
        "tinysam_w8a8.pth",
        "https://github.com/xinghaochen/TinySAM/releases/download/2.0/tinysam_w8a8.pth",
        None,
        loadable=False,
        note=(
            "it is a pickled Python module, which this toolkit never unpickles. Load the float "
            "tinysam_42.3.pth instead and quantize it with `python -m quantize`"
        ),
    ),
}

# SAM 2.1: the file names and URLs of Meta's checkpoints/download_ckpts.sh (facebookresearch/sam2 at 2b90b9f,
# the code of sam2 1.1.0). Neither the script nor the repository gives a SHA-256 or a size. The Git LFS pages
# of Meta's hub repositories facebook/sam2.1-hiera-{tiny,small,base-plus,large} should give both per file, but
# they have not been read yet (values from re-uploads or other sites are not used), so these files load
# unverified, like TinySAM's (keys still strict, weights_only still on). Fill in sha256 and size from there.
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
for _size in ("tiny", "small", "base_plus", "large"):
    KNOWN_CHECKPOINTS[f"sam2.1_hiera_{_size}"] = KnownCheckpoint(
        f"sam2.1_hiera_{_size}", f"sam2.1_hiera_{_size}.pt", f"{_SAM2_URL}/sam2.1_hiera_{_size}.pt", None
    )
del _size


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _known_by_name_or_filename(checkpoint: str | os.PathLike) -> KnownCheckpoint | None:
    """The known checkpoint named by `checkpoint` (its key, or its official file name in any folder)."""
    for key, known in KNOWN_CHECKPOINTS.items():
        if str(checkpoint) == key or Path(checkpoint).name == known.filename:
            return known
    return None


def _fetch_advice(known: KnownCheckpoint) -> str:
    return (
        f"Download it again from {known.url} and put it at {cache_dir() / known.filename}, "
        f"or pass the path of a good copy."
    )


def verify_checkpoint(path: Path, known: KnownCheckpoint) -> None:
    """Check a file against its published size, then its published SHA-256 (where published).

    The digest is remembered per file version, so a file that passed is not hashed again.
    """
    if known.size is not None:
        size = path.stat().st_size
        if size != known.size:
            raise CheckpointError(
                f"{path} is {size:,} bytes, but the official {known.filename} is {known.size:,} bytes: "
                f"it is truncated (an interrupted download?) or another file. {_fetch_advice(known)}"
            )
    if known.sha256 is None:
        return
    actual = sha256_file(path)
    if actual != known.sha256:
        raise CheckpointError(
            f"{path} is not the official {known.filename}: its SHA-256 is\n  {actual}\nbut the published "
            f"SHA-256 is\n  {known.sha256}\nThe file is corrupt or another version. {_fetch_advice(known)}"
        )


def resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """A local, verified path for a checkpoint given as a path or a known name, fetching it if needed."""
    path = Path(checkpoint).expanduser()
    known = _known_by_name_or_filename(checkpoint)
    if known is not None and not known.loadable:
        raise CheckpointError(f"{known.filename} is not supported: {known.note}.")
    if path.is_file():
        if known is not None:
            verify_checkpoint(path, known)
        return path
    if known is None:
        names = ", ".join(KNOWN_CHECKPOINTS)
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} is neither an existing file nor a known checkpoint name "
            f"({names}). Pass the path of the file you downloaded."
        )
    cached = cache_dir() / known.filename
    if cached.is_file():
        verify_checkpoint(cached, known)
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:  # torch.hub writes a temporary file and renames it: a failed download leaves nothing at `cached`
        torch.hub.download_url_to_file(known.url, str(cached), hash_prefix=None, progress=True)
    except Exception as exc:  # no network, HTTP error, disk full: one message for all
        raise CheckpointError(
            f"could not download {known.filename} from {known.url} ({type(exc).__name__}: {exc}). "
            f"Download it on a machine with internet access and either put it at {cached} "
            f"or pass its path, e.g. --checkpoint /path/to/{known.filename}"
        ) from exc
    try:
        verify_checkpoint(cached, known)
    except CheckpointError as exc:  # delete what we fetched, so the next run does not trust it
        cached.unlink(missing_ok=True)
        raise CheckpointError(
            f"the download from {known.url} was deleted because it failed verification. {exc}"
        ) from None
    return cached


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)  # older torch.save files


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    """Why torch.load failed on `path`, told from the file's bytes rather than torch's exception."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError as os_error:
        return CheckpointError(f"cannot read {path}: {os_error.strerror or os_error}")
    again = "Save, copy or download it again."
    if size == 0:
        return CheckpointError(f"{path} is empty (0 bytes): an interrupted save, copy or download. {again}")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_MAGIC)):
        return CheckpointError(
            f"{path} is not a PyTorch checkpoint (its bytes are neither torch.save's zip archive nor its "
            f"older format): a corrupt file or the wrong file. Check the path, or {again.lower()}"
        )
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        return CheckpointError(
            f"{path} is a truncated PyTorch checkpoint ({size:,} bytes; its zip archive has no end): "
            f"an interrupted save, copy or download. {again}"
        )
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    unsafe = [line for line in lines if "unsupported global" in line.lower()]
    if isinstance(exc, pickle.UnpicklingError) and unsafe:
        return CheckpointError(
            f"{path} contains pickled Python objects, not only tensors, and is refused for safety "
            f"(a pickled module, such as TinySAM's tinysam_w8a8.pth, could run any code). "
            f"Use a state-dict checkpoint. Details: {unsafe[0]}"
        )
    detail = lines[0] if lines else ""
    return CheckpointError(
        f"{path} is a truncated or corrupt PyTorch checkpoint ({type(exc).__name__}: {detail}). {again}"
    )


def load_torch_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` whose errors name the file and say what is wrong with it.

    Raises CheckpointError for a missing, empty, foreign, truncated or corrupt file, and for a file
    that holds pickled Python objects (code) besides tensors, each with its own message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError, OSError, ...)
        raise _unreadable(path, exc) from exc


def _unwrap_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, header) from a raw state dict or a wrapped one."""
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return dict(obj["state_dict"]), {k: v for k, v in obj.items() if k != "state_dict"}
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (found {type(obj).__name__}).")
    return dict(obj), {}


def read_checkpoint(checkpoint: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (state_dict, header) without unpickling code; header is {} for foreign files."""
    path = resolve_checkpoint(checkpoint)
    return _unwrap_state_dict(load_torch_file(path), path)


def _reference_shapes(name: str) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build_architecture(name)
    return {k: v.shape for k, v in model.state_dict().items()}


def guess_model(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registered model whose keys and shapes match `state_dict` exactly, if any.

    Only models of the state dict's family are tried (SAM 2's ``SAM2Base`` holds ``no_mem_embed``, SAM's
    ``Sam`` does not); a SAM 2 state dict without the ``sam2`` extra raises MissingExtraError.
    """
    shapes = {k: v.shape for k, v in state_dict.items()}
    family = "sam2" if "no_mem_embed" in shapes else "sam"
    for name in list_models(family=family):
        if _reference_shapes(name) == shapes:
            return name
    return None


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names every missing, unexpected and mis-shaped key in one error."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit this model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_describe(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches, checkpoint vs model ({len(mismatched)}): {_describe(mismatched)}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def load_model_weights(sam: nn.Module, name: str, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Load `checkpoint` into a model built as `name`; returns the checkpoint's header."""
    name = canonical_name(name)
    known = _known_by_name_or_filename(checkpoint)
    if known is not None and known.model != name:
        raise CheckpointError(f"{known.filename} is a {known.model} checkpoint; build {known.model!r}, not {name!r}.")
    state_dict, header = read_checkpoint(checkpoint)
    saved_name = header.get("model_name")
    if saved_name is not None and saved_name != name:
        raise CheckpointError(
            f"{checkpoint} holds a {saved_name!r} model; build it with --model {saved_name}, not {name!r}."
        )
    try:
        load_state_dict_strict(sam, state_dict, str(checkpoint))
    except CheckpointError as exc:
        try:
            guess = guess_model(state_dict)
        except MissingExtraError:  # a SAM 2 file, and no sam2 to build the candidates with
            guess = None
        hint = f"\nIt matches the registered model {guess!r}: build that one instead." if guess else ""
        raise CheckpointError(f"{exc}{hint}") from None
    return header


def save_checkpoint(sam: nn.Module, name: str, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write a self-describing checkpoint atomically (temporary file, then rename)."""
    spec = get_spec(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": spec.name,
        "model_config": dict(spec.encoder_kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in sam.state_dict().items()},
        "meta": dict(meta or {}),
    }
    atomic_torch_save(payload, path)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save that never leaves a half-written file at `path`, even if killed mid-write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
