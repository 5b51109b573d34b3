"""Data folders shipped with the package: rotation configs and tiny-model recipes.

The top-level `rotation_configs/` and `models/` folders are the source; pyproject.toml installs
them as the packages `onnxquant.rotation_configs` and `onnxquant.model_recipes`, so a regular
`pip install .` finds them too. They are located without importing anything.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir(package: str, repo_folder: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if Path(location).is_dir():
                return Path(location)
    return REPO_ROOT / repo_folder


def rotation_config_dir() -> Path:
    return data_dir("onnxquant.rotation_configs", "rotation_configs")


def model_recipe_dir() -> Path:
    return data_dir("onnxquant.model_recipes", "models")
