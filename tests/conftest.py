"""Shared fixtures: the real SmolLM2 model and the models that fixtures/build.py trains.

Every fixture builds on first use and caches under ``kinject_pytest.models.cache_dir()``
(``$KINJECT_CACHE_DIR`` or ``~/.cache/kinject``), so a second test run starts in seconds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

# pytester's in-process runs drop every module the inner run imported, and torch cannot be imported
# a second time in one process ("SystemError: bad call flags"). Importing the heavy modules here
# keeps them loaded across runs.
import kinject_pytest.session  # noqa: F401  (imports torch-free modules; torch follows below)
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent


def _load_fixture_builders() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kinject_fixture_build", REPO / "fixtures" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def builders() -> ModuleType:
    return _load_fixture_builders()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from kinject_pytest.models import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def tiny_llama_dir(builders) -> Path:
    return builders.build_tiny_llama()


@pytest.fixture(scope="session")
def tiny_lora_dir(builders, tiny_llama_dir) -> Path:
    return builders.build_tiny_lora()


@pytest.fixture(scope="session")
def smollm2_lora_dir(builders, smollm2_dir) -> Path:
    return builders.build_lora()


@pytest.fixture(scope="session")
def smollm2_full_dir(builders, smollm2_dir) -> Path:
    return builders.build_full_finetune()


@pytest.fixture(scope="session")
def counterfactual_edits(builders) -> list[dict[str, str]]:
    return builders.counterfactual_edits()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path
