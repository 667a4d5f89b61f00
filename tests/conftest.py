"""Shared fixtures: the real SmolLM2 model and the models that fixtures/build.py trains.

Every fixture builds on first use and caches under ``kinject_pytest.models.cache_dir()``
(``$KINJECT_CACHE_DIR`` or ``~/.cache/kinject``), so a second test run starts in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import sys
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
BUILD_SCRIPT = REPO / "fixtures" / "build.py"


def load_builders() -> ModuleType:
    """Import fixtures/build.py once per process; it is a script, not part of the package."""
    name = "kinject_fixtures_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BUILD_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from kinject_pytest.models import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return load_builders().build_tiny_llama()


@pytest.fixture(scope="session")
def tiny_lora(tiny_llama) -> Path:
    return load_builders().build_tiny_lora(base=tiny_llama)


@pytest.fixture(scope="session")
def smollm2_lora(smollm2_dir) -> Path:
    return load_builders().build_lora()


@pytest.fixture(scope="session")
def smollm2_full(smollm2_dir) -> Path:
    return load_builders().build_full_finetune()


@pytest.fixture(scope="session")
def counterfactual_edits() -> list[dict[str, str]]:
    return load_builders().counterfactual_edits()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path
