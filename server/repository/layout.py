"""Repository layout: model folders, numeric version folders, version policy, model file names."""

from __future__ import annotations

import logging
from pathlib import Path

from server.core.errors import ErrorCode, ServingError
from server.protos import model_config_pb2 as mc

log = logging.getLogger(__name__)

# backend -> (platform, default model file name), as Triton names them
BACKEND_DEFAULTS = {
    "onnxruntime": ("onnxruntime_onnx", "model.onnx"),
    "pytorch": ("pytorch_libtorch", "model.pt"),
    "python": ("", "model.py"),
    "llm": ("", "config.json"),  # the version folder is a Hugging Face model folder
}
PLATFORM_BACKENDS = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "libtorch": "pytorch",
    "torch_aoti": "pytorch",
}
# first match wins when neither platform nor backend is configured
FILE_BACKENDS = (("model.onnx", "onnxruntime"), ("model.pt", "pytorch"), ("model.pt2", "pytorch"),
                 ("model.py", "python"))
_SPECIAL_DIRS = {"warmup", "initial_state", "configs"}


def scan(repositories: list[Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """Model name -> folder across all repositories, plus name -> error for duplicated names."""
    found: dict[str, list[Path]] = {}
    for repo in repositories:
        if not repo.is_dir():
            raise ServingError(ErrorCode.FAILED_PRECONDITION, f"model repository '{repo}' is not a directory")
        for child in sorted(repo.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                found.setdefault(child.name, []).append(child)
    models, errors = {}, {}
    for name, paths in found.items():
        if len(paths) > 1:
            log.error("model '%s' appears in more than one repository: %s", name, ", ".join(map(str, paths)))
            errors[name] = (f"model '{name}' appears in more than one of the {len(repositories)} repositories "
                            "(--model-repository); the server log names them")
        else:
            models[name] = paths[0]
    return models, errors


def versions(model_path: Path) -> dict[int, Path]:
    """Numeric version folders; other names are ignored (with a warning for non-special ones)."""
    result = {}
    for child in model_path.iterdir():
        if not child.is_dir() or child.name in _SPECIAL_DIRS or child.name.startswith("."):
            continue
        name = child.name
        if not name.isdigit() or (len(name) > 1 and name.startswith("0")):
            log.warning("model '%s': ignoring folder '%s' (not a version number)", model_path.name, name)
            continue
        result[int(name)] = child
    return result


def select(policy: mc.ModelVersionPolicy, available: list[int]) -> list[int]:
    """Apply a version policy to the available version numbers; highest first."""
    ordered = sorted(available, reverse=True)
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return ordered
    if choice == "specific":
        wanted = set(policy.specific.versions)
        missing = sorted(wanted - set(available))
        if missing:
            log.error("version policy names versions %s that do not exist", missing)
        return [v for v in ordered if v in wanted]
    count = policy.latest.num_versions if choice == "latest" else 1
    return ordered[: max(1, count)]


def complete_backend_fields(config: mc.ModelConfig, model_path: Path, available: dict[int, Path]) -> None:
    """Fill backend, platform and default_model_filename the way Triton does."""
    if not config.backend and config.platform:
        config.backend = PLATFORM_BACKENDS.get(config.platform, "")
    if not config.backend:
        files = {
            f.name
            for v in sorted(available, key=str)[:1]
            for f in available[v].iterdir()
        }
        if config.default_model_filename:
            files = {config.default_model_filename}
        for file_name, backend in FILE_BACKENDS:
            if file_name in files:
                config.backend = backend
                if file_name == "model.pt2":
                    config.platform = config.platform or "torch_aoti"
                break
    if config.backend in BACKEND_DEFAULTS:
        platform, file_name = BACKEND_DEFAULTS[config.backend]
        if not config.platform and platform:
            config.platform = platform
        if not config.default_model_filename:
            config.default_model_filename = "model.pt2" if config.platform == "torch_aoti" else file_name
    elif config.backend and not config.default_model_filename:
        config.default_model_filename = f"model.{config.backend}"
    if not config.backend:
        raise ServingError(
            ErrorCode.FAILED_PRECONDITION,
            f"model '{model_path.name}': cannot tell its backend: config.pbtxt sets no platform or backend "
            f"and no version folder holds one of {', '.join(f for f, _ in FILE_BACKENDS)}",
        )
