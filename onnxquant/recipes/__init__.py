"""Recipes: what `onnxquant.quantize` does to a model, as versioned data (schema.py), and the built-in
ones shipped as YAML files in builtin/ (`onnxquant recipes` lists them)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from onnxquant.recipes.schema import (METADATA_KEYS, RECIPE_VERSION, Algorithm, CalibrationData, FuseNorms, Grid,
                                      HadamardGroups, KVCache, Lowering, Observer, Override, Quantize, R4, Recipe, RecipeError,
                                      Rotate, Smooth, Verify)

__all__ = ["Algorithm", "BuiltinRecipe", "CalibrationData", "FuseNorms", "Grid", "HadamardGroups", "KVCache", "Lowering",
           "METADATA_KEYS", "Observer", "Override", "Quantize", "R4", "RECIPE_VERSION", "Recipe", "RecipeError",
           "Rotate", "Smooth", "Verify", "builtin_recipes", "load_recipe"]


@dataclass(frozen=True)
class BuiltinRecipe:
    name: str
    recipe: Recipe
    measured: dict  # the figure its file records: model, perplexity, float, size_mb, blocks


def _builtin_files() -> dict[str, Path]:
    folder = resources.files("onnxquant.recipes") / "builtin"
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def builtin_recipes() -> list[BuiltinRecipe]:
    import yaml

    found = []
    for name, path in sorted(_builtin_files().items()):
        found.append(BuiltinRecipe(name, Recipe.from_file(path), yaml.safe_load(path.read_text()).get("measured", {})))
    return found


def load_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A recipe by built-in name (`w8a8`, `w4a16`, ...), from a YAML or JSON file, or as given."""
    if isinstance(recipe, Recipe):
        return recipe
    files = _builtin_files()
    if isinstance(recipe, str) and recipe in files:
        return Recipe.from_file(files[recipe])
    path = Path(recipe)
    if not path.exists() and path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise RecipeError(f"unknown recipe {str(recipe)!r}: neither a built-in name ({', '.join(sorted(files))}) "
                          "nor a recipe file")
    return Recipe.from_file(path)
