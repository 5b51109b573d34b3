"""The documentation's examples run as written (on a tiny model in place of SmolLM2), and the site builds."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from onnxquant.recipes import Recipe

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S)


def test_api_page_examples_run(tiny_models, tmp_path, monkeypatch):
    import onnxquant

    source = tiny_models.hf("tiny-llama-96")
    # export(None, ...) stands for the embedded SmolLM2; the tiny checkpoint takes its place here.
    real_export = onnxquant.export
    monkeypatch.setattr(onnxquant, "export", lambda model, output, **kw: real_export(model or source, output, **kw))
    # ... and, having no chat template, answers raw prompts.
    real_generate = onnxquant.generate
    monkeypatch.setattr(onnxquant, "generate", lambda *a, **kw: real_generate(*a, **kw, chat_template=False))
    namespace = {}
    for block in _blocks("guide/api.md", "python"):
        block = re.sub(r"^float_dir, out_dir = .*$", f"float_dir, out_dir = {str(tmp_path / 'fp32')!r}, "
                                                    f"{str(tmp_path / 'w4')!r}", block, flags=re.M)
        exec(compile(block, "docs/guide/api.md", "exec"), namespace)
    assert namespace["result"].quality is not None and (tmp_path / "w4" / "model.onnx").is_file()


def test_quantize_page_recipe_file_loads():
    (block,) = [b for b in _blocks("guide/quantize.md", "yaml") if "onnxquant_recipe" in b]
    recipe = Recipe.from_dict(yaml.safe_load(block), "docs/guide/quantize.md")
    assert [s.name for s in recipe.resolved().stages] == ["fuse_norms", "rotate", "smooth", "quantize"]


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=DOCS.parent,
                            capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "recipes" / "w8a8" / "index.html").is_file()
    assert "--hessian_token_stride" in (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
