"""Single-model storage: serve a folder that holds one model (not a repository) under one name.

KServe's storage initializer puts an InferenceService's ``storageUri`` at ``/mnt/models``: a
Triton-style repository, one model folder (``config.pbtxt`` and/or numeric version folders at its
root), or bare model file(s) (``model.onnx``, ``resnet50.onnx``, ...; a PVC sub-path may even
mount the file itself there). The repository manager only knows repositories, so for the
single-model layouts this module builds a small generated repository of symlinks in a temporary
folder, and the server reads that one instead (``<name>`` is ``--model-name``):

    model folder  <tmp>/<name> -> /mnt/models                 (the whole folder: poll mode sees it change)
    model file    <tmp>/<name>/1/<entry> -> /mnt/models/<entry>   (every root entry, so external
                  <tmp>/<name>/1/model.onnx -> the model file         data files sit beside the model)
                  <tmp>/<name>/config.pbtxt -> /mnt/models/config.pbtxt (when there is one)

A config.pbtxt whose ``name`` differs from ``--model-name`` is copied with the name replaced. The
config is completed from the model file as for any model (ONNX inputs, outputs, batching).

How a folder is read (``--repository-layout``, default ``auto``): the repository reading wins. A
folder is a repository as soon as one subfolder looks like a model folder (a ``config.pbtxt`` or a
numeric version folder inside it); files at its root are then ignored, as Triton ignores them, and
named in one INFO line, so a stray ``bert_state.pt`` beside ``bert/1/model.onnx`` cannot turn the
repository into one model. Only a folder with no such subfolder and numeric version folders or a
model file of its own is a single model. An empty folder is refused in ``auto`` (nothing to serve
is almost always a wrong mount); ``repository`` and ``single`` force either reading.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from server.core.errors import ErrorCode, ServingError
from server.protos import model_config_pb2 as mc

from . import layout, pbtxt
from .layout import _SPECIAL_DIRS as SPECIAL_DIRS  # warmup, initial_state, configs

log = logging.getLogger(__name__)

REPOSITORY, MODEL_FOLDER, MODEL_FILE = "repository", "model folder", "model file"
AUTO, SINGLE = "auto", "single"
LAYOUTS = (AUTO, REPOSITORY, SINGLE)  # --repository-layout: how a folder is read
DEFAULT_NAME = "model"  # KServe's python model server uses the same default
_CANONICAL = tuple(name for name, _ in layout.FILE_BACKENDS)  # model.onnx, model.pt, model.pt2, model.py
_SUFFIXES = (".onnx", ".pt", ".pt2")  # any file with one of these names a model when it is alone


@dataclass(frozen=True)
class Detected:
    """What a --model-repository folder holds."""

    kind: str  # REPOSITORY, MODEL_FOLDER or MODEL_FILE
    model_file: Path | None = None  # MODEL_FILE: the file to serve
    config: Path | None = None  # config.pbtxt at the root, if any


def _is_version(name: str) -> bool:
    # the rule layout.versions applies: digits, and no leading zero except "0" itself
    return name.isdigit() and not (len(name) > 1 and name.startswith("0"))


def _visible(folder: Path) -> list[Path]:
    return [e for e in sorted(folder.iterdir()) if not e.name.startswith(".")]


def _looks_like_model(folder: Path) -> bool:
    """A model folder: a config.pbtxt, or numeric version folders (where its model files live)."""
    try:
        return (folder / "config.pbtxt").is_file() or any(
            e.is_dir() and _is_version(e.name) for e in _visible(folder))
    except OSError:  # unreadable: not evidence of anything
        return False


def _model_file(root: Path, files: list[Path]) -> Path | None:
    names = {f.name: f for f in files}
    for canonical in _CANONICAL:
        if canonical in names:
            return names[canonical]
    candidates = sorted(f for f in files if f.suffix in _SUFFIXES)
    if len(candidates) > 1:
        raise ServingError(
            ErrorCode.FAILED_PRECONDITION,
            f"'{root}' holds several model files at its root ({', '.join(f.name for f in candidates)}): "
            f"keep one, or name the one to serve {' or '.join(_CANONICAL[:2])}",
        )
    return candidates[0] if candidates else None


def detect(root: Path, layout: str = AUTO) -> Detected:
    """Classify a --model-repository folder; raises FAILED_PRECONDITION when it is neither kind.

    ``auto`` prefers the repository reading: any subfolder that looks like a model folder makes
    the folder a repository, whatever else lies at its root. Only a folder without one, holding
    numeric version folders or a model file itself, is a single model. ``repository`` and
    ``single`` force one reading.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not '{layout}'")
    if root.is_file() and layout != REPOSITORY and (root.name in _CANONICAL or root.suffix in _SUFFIXES):
        return Detected(MODEL_FILE, model_file=root)  # e.g. a PVC sub-path mounted at /mnt/models
    if not root.is_dir():
        what = "" if layout == REPOSITORY else " (nor a model file)"
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"model repository '{root}' is not a directory{what}")
    if layout == REPOSITORY:
        return Detected(REPOSITORY)
    entries = _visible(root)
    dirs = [e for e in entries if e.is_dir()]
    if layout == AUTO and any(_looks_like_model(d) for d in dirs):
        return Detected(REPOSITORY)
    config = root / "config.pbtxt"
    config = config if config.is_file() else None
    if any(_is_version(d.name) for d in dirs):
        return Detected(MODEL_FOLDER, config=config)
    model_file = _model_file(root, [e for e in entries if e.is_file()])
    if model_file is not None:
        return Detected(MODEL_FILE, model_file=model_file, config=config)
    if config is not None:
        raise ServingError(
            ErrorCode.FAILED_PRECONDITION,
            f"'{root}' has a config.pbtxt at its root but no version folder (e.g. '1/') and no model "
            f"file ({', '.join(_CANONICAL)} or one *.onnx / *.pt / *.pt2 file) beside it",
        )
    held = f"it holds: {', '.join(e.name for e in entries)}" if entries else "it is empty"
    if layout == SINGLE:
        raise ServingError(
            ErrorCode.FAILED_PRECONDITION,
            f"--repository-layout=single: '{root}' holds no single model (no numeric version folder and "
            f"no model file such as {', '.join(_CANONICAL)} at its root); {held}",
        )
    if not entries:
        raise ServingError(
            ErrorCode.FAILED_PRECONDITION,
            f"'{root}' is empty: no model folder and no model file to serve. To start on an empty "
            "repository and add models later (explicit or poll mode), pass --repository-layout=repository",
        )
    if any(d.name not in SPECIAL_DIRS for d in dirs):
        # folders without a config.pbtxt or version folder: Triton's reading, and each model's
        # load then says what its folder lacks
        return Detected(REPOSITORY)
    raise ServingError(
        ErrorCode.FAILED_PRECONDITION,
        f"'{root}' is neither a model repository (no model folders) nor a single model (no config.pbtxt, "
        f"numeric version folder, or model file such as {', '.join(_CANONICAL)} at its root); {held}",
    )


def _report_stray_files(root: Path) -> None:
    """One INFO line naming the files at a repository's root: only model folders are served."""
    files = sorted(e.name for e in root.iterdir() if not e.is_dir())
    if not files:
        return
    hint = ""
    if any(n == "config.pbtxt" or n in _CANONICAL or Path(n).suffix in _SUFFIXES for n in files):
        hint = " (to serve the folder itself as one model, pass --repository-layout=single)"
    log.info("model repository '%s': ignoring %d file(s) at its root, which are not model folders: %s%s",
             root, len(files), ", ".join(files), hint)


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name:
        raise ServingError(ErrorCode.FAILED_PRECONDITION,
                           f"--model-name '{name}' cannot name a model folder "
                           "(use letters, digits, '-', '_')")


def _config_name(path: Path) -> str:
    # lenient and quiet: the load parses the file again and reports what is wrong with it
    proto = mc.ModelConfig()
    try:
        text_format.Parse(path.read_text(), proto, allow_unknown_field=True)
    except (text_format.ParseError, OSError, UnicodeDecodeError):
        return ""
    return proto.name


def _write_config(source: Path, target: Path, name: str) -> None:
    # the served name comes from --model-name: a stale `name:` in the file would fail the load
    proto, _ = pbtxt.parse_text(name, source.read_text())
    proto.name = name
    target.write_text(f"# generated by inferd from {source} (name set from --model-name)\n"
                      + text_format.MessageToString(proto))


def materialize(root: Path, found: Detected, name: str, workdir: Path) -> Path:
    """Build the generated repository for a single model under ``workdir``; returns its path."""
    _check_name(name)
    repo = workdir / "repository"
    model = repo / name
    repo.mkdir(parents=True, exist_ok=True)
    root = root.absolute()
    renamed = found.config is not None and _config_name(found.config) not in ("", name)
    if found.kind == MODEL_FOLDER and not renamed:
        model.symlink_to(root, target_is_directory=True)
        return repo
    model.mkdir()
    if found.kind == MODEL_FOLDER:
        if found.config is not None:
            _write_config(found.config, model / "config.pbtxt", name)  # renamed: the name comes from us
            log.info("single model: config.pbtxt names another model; serving it as '%s'", name)
        for entry in root.iterdir():
            if entry.name != "config.pbtxt" and not entry.name.startswith("."):
                (model / entry.name).symlink_to(entry.absolute())
        return repo
    # a bare model file: version 1 *is* the folder it lies in (a link to the folder, so the file stays
    # inside its version folder when links are followed, as the loader's confinement check wants)
    (model / "1").symlink_to(root if root.is_dir() else root.parent, target_is_directory=True)
    default = "model" + found.model_file.suffix
    if found.model_file.name == default and not renamed:
        if found.config is not None:
            (model / "config.pbtxt").symlink_to(found.config.absolute())
        return repo
    proto = pbtxt.parse_text(name, found.config.read_text())[0] if found.config is not None else mc.ModelConfig()
    proto.name = name
    if found.model_file.name != default and not proto.default_model_filename:
        proto.default_model_filename = found.model_file.name
        if not proto.backend and not proto.platform:
            proto.backend = _SUFFIX_BACKENDS.get(found.model_file.suffix, "")
    source = found.config or found.model_file
    (model / "config.pbtxt").write_text(f"# generated by inferd for {source.name} (served as '{name}')\n"
                                        + text_format.MessageToString(proto))
    return repo


_SUFFIX_BACKENDS = {".onnx": "onnxruntime", ".pt": "pytorch", ".pt2": "pytorch", ".py": "python"}


def prepare(repositories: list[Path], model_name: str, workdir: Path | None = None,
            layout: str = AUTO) -> list[Path]:
    """The repository paths to serve: each single-model folder replaced by a generated repository.

    ``layout`` is --repository-layout (auto, repository or single). The generated folders live
    under ``workdir`` (default: a new temporary folder removed at exit).
    """
    name = model_name or DEFAULT_NAME
    found_all = [(root, detect(root, layout)) for root in repositories]
    singles = [str(root) for root, found in found_all if found.kind != REPOSITORY]
    if len(singles) > 1:
        raise ServingError(ErrorCode.FAILED_PRECONDITION,
                           f"{' and '.join(singles)} each hold a single model: all would be served as "
                           f"'{name}'; serve one of them, or arrange them as one repository")
    result: list[Path] = []
    for root, found in found_all:
        if found.kind == REPOSITORY:
            _report_stray_files(root)
            result.append(root)
            continue
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="inferd-single-"))
            atexit.register(shutil.rmtree, workdir, ignore_errors=True)
        target = workdir / str(len(result))
        result.append(materialize(root, found, name, target))
        what = found.model_file.name if found.model_file else "its version folders"
        log.info("'%s' holds a single model (%s, %s): serving it as '%s'", root, found.kind, what, name)
    return result
