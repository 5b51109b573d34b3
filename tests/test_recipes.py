"""Recipes as data: built-ins, YAML round trips, one-line errors naming the file and the key, flags that mean a
recipe, and the recipe saved beside every model reproducing it byte for byte."""

import dataclasses
import filecmp
import subprocess
import sys

import pytest
import yaml

import onnxquant
from onnxquant.recipes import (Grid, HadamardGroups, Override, Quantize, Recipe, RecipeError, Rotate, Smooth,
                               builtin_recipes, load_recipe)

from conftest import assert_user_error, run_module

BUILTIN_NAMES = {"w8a8", "w8a8-fast", "w4a16", "w4a16-fast", "w4a16-8bit-ends", "fp8", "mxfp8", "mxfp4", "nvfp4"}


def test_builtin_recipes_are_the_named_set_and_each_records_a_figure():
    found = {b.name: b for b in builtin_recipes()}
    assert BUILTIN_NAMES <= set(found)
    for builtin in found.values():
        assert builtin.recipe.name == builtin.name
        assert builtin.measured["perplexity"] > builtin.measured["float"] > 0


@pytest.mark.parametrize("name", sorted(BUILTIN_NAMES))
def test_resolved_recipe_survives_a_yaml_round_trip(name):
    recipe = load_recipe(name).resolved()
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    assert recipe.resolved() == recipe


def test_resolving_adds_fuse_norms_ahead_of_rotation_and_writes_the_grids_out():
    recipe = Recipe(stages=(Rotate(), Quantize("UINT4_PER_GROUP_ASYM"))).resolved()
    assert [s.name for s in recipe.stages] == ["fuse_norms", "rotate", "quantize"]
    quantize = recipe.stage(Quantize)
    assert quantize.weights == Grid("uint4", "per_block", symmetric=False, block_size=128)
    assert quantize.weight_only and quantize.activations is None


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, needles", [
    ("onnxquant_recipe: 1\nstages: [{quantize: {algorithm: {nmae: gptq}}}]\n", ["stages[0].quantize.algorithm.nmae", "unknown key"]),
    ("onnxquant_recipe: 1\ncalibration: {samples: many}\n", ["calibration.samples", "a whole number", "'many'"]),
    ("onnxquant_recipe: 1\nstages: [{rotate: {}}, {spin: {}}]\n", ["stages[1]", "unknown stage 'spin'"]),
    ("onnxquant_recipe: 1\nstages: [{r4: {}}, {smooth: {}}]\n", ["stages[1]", "smooth must come before r4"]),
    ("onnxquant_recipe: 1\nstages: [{quantize: {}}, {rotate: {}}]\n", ["rotate must come before quantize"]),
    ("onnxquant_recipe: 99\n", ["onnxquant_recipe", "version 99 is newer", "upgrade onnxquant"]),
    ("name: x\n", ["no onnxquant_recipe key"]),
    ("onnxquant_recipe: 1\nstages: [{smooth: {alpha: 1.5}}]\n", ["stages[0].smooth.alpha", "between 0 and 1"]),
    ("onnxquant_recipe: 1\nstages: [{quantize: {scheme: INT3}}]\n", ["stages[0].quantize.scheme", "unknown scheme 'INT3'"]),
    ("onnxquant_recipe: 1\nstages: [{quantize: {weights: {dtype: int8, granularity: per_block, block_size: 100}}}]\n",
     ["stages[0].quantize.weights", "block size 100"]),
    ("onnxquant_recipe: 1\nstages: [{quantize: {overrides: [{match: lm_head}]}}]\n",
     ["stages[0].quantize.overrides[0].weights", "sets nothing"]),
    ("onnxquant_recipe: 1\nstages: [{quantize: {algorithm: {name: magic}}}]\n",
     ["stages[0].quantize.algorithm.name", "unknown weight algorithm 'magic'", "gptq"]),
    ("onnxquant_recipe: 1\nstages: [{quantize: {scheme: INT8_PER_CHANNEL, algorithm: {name: awq}}}]\n",
     ["algorithm.name", "awq applies to weight-only formats"]),
    ("onnxquant_recipe: 1\nstages: [{quantize: {lowering: {accuracy_level: 3}}}]\n", ["lowering.accuracy_level", "0 or 1 or 2 or 4"]),
    ("onnxquant_recipe: 1\nstages: [\n", ["is not valid YAML"]),
])
def test_bad_recipe_file_is_one_line_naming_file_and_key(tmp_path, text, needles):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        Recipe.from_file(path)
    message = str(caught.value)
    assert message.startswith(f"recipe {path}:") and "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_cli_refuses_a_bad_recipe_before_any_work(tiny_models, tmp_path):
    path = _write(tmp_path, "onnxquant_recipe: 1\nstages: [{quantize: {scheme: INT8_PER_CHANNEL, colour: red}}]\n")
    result = run_module("onnxquant.cli.quantize", str(tiny_models.onnx("tiny-llama-96")), str(tmp_path / "out"),
                        "--recipe", str(path))
    assert_user_error(result, str(path), "stages[0].quantize.colour")
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_name_lists_the_built_ins(tmp_path):
    with pytest.raises(RecipeError, match="w8a8"):
        load_recipe("w9a9")


MAIN_JOB_FLAGS = ["--num_calib_data", "64", "--use_moving_average", "--config", "INT8_PER_CHANNEL", "--include_rotation",
                  "--include_sq", "--sq_alpha", "auto", "--sq_num_calib_data", "16", "--include_r4", "--algo", "gptq",
                  "--hessian_token_stride", "8", "--hadamard_group_size", "64"]


def _printed(*flags):
    result = subprocess.run([sys.executable, "-m", "onnxquant.cli.quantize", "--print_recipe", *flags],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return Recipe.from_dict(yaml.safe_load(result.stdout))


def test_the_main_jobs_flags_mean_the_w8a8_recipe():
    assert dataclasses.replace(_printed(*MAIN_JOB_FLAGS), name="w8a8", description="") == \
        dataclasses.replace(load_recipe("w8a8").resolved(), description="")


def test_the_4bit_gptq_flags_mean_the_w4a16_recipe():
    printed = _printed("--config", "UINT4_PER_GROUP_ASYM", "--algo", "gptq", "--include_rotation")
    assert dataclasses.replace(printed, name="w4a16", description="") == \
        dataclasses.replace(load_recipe("w4a16").resolved(), description="")


def test_a_flag_given_with_a_recipe_replaces_only_its_setting():
    printed = _printed("--recipe", "w8a8", "--num_calib_data", "32", "--sq_alpha", "0.6")
    expected = load_recipe("w8a8").resolved()
    assert printed.calibration.samples == 32 and printed.stage(Smooth).alpha == 0.6
    assert printed.stage(Quantize) == expected.stage(Quantize)
    assert printed.stage(HadamardGroups) == expected.stage(HadamardGroups)


def test_print_recipe_writes_nothing(tmp_path):
    result = run_module("onnxquant.cli.quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--recipe", "w4a16",
                        "--print_recipe")
    assert result.returncode == 0 and "onnxquant_recipe: 1" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_recipes_command_lists_every_built_in_with_its_figure():
    result = run_module("onnxquant.cli.recipes")
    assert result.returncode == 0, result.stderr
    for name in BUILTIN_NAMES:
        line = next(line for line in result.stdout.splitlines() if line.split()[0] == name)
        assert "perplexity" in line and "MB" in line


TINY_CALIBRATION = {"samples": 8, "seq_len": 128}


def _tiny(recipe: Recipe, **changes) -> Recipe:
    return dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, **TINY_CALIBRATION), **changes)


@pytest.fixture(scope="module")
def tiny_w8a8(tiny_models, tmp_path_factory):
    """The w8a8 recipe, whole (R1, SmoothQuant auto, R4, groups of 64, GPTQ), on the 576-wide tiny model."""
    w8a8 = load_recipe("w8a8")
    stages = tuple(dataclasses.replace(s, samples=4) if isinstance(s, Smooth) else s for s in w8a8.stages)
    recipe = _tiny(w8a8, stages=stages)
    out = tmp_path_factory.mktemp("w8a8") / "out"
    return onnxquant.quantize(tiny_models.onnx("tiny-llama-576"), out, recipe), out


def test_w8a8_recipe_quantizes_every_matmul_and_stays_near_float(tiny_w8a8):
    result, out = tiny_w8a8
    assert result.report.quantized_nodes > 0 and result.report.calibration_passes == 2
    assert result.quality.ratio < 1.05 and result.quality.agreement > 0.8
    assert "rotation=R1" in result.summary_line and "r4=down_proj" in result.summary_line


def test_saved_recipe_reproduces_the_model_byte_for_byte(tiny_models, tiny_w8a8, tmp_path):
    result, out = tiny_w8a8
    again = onnxquant.quantize(tiny_models.onnx("tiny-llama-576"), tmp_path / "again", out / "quantization_recipe.yaml")
    assert again.recipe == result.recipe
    for name in ("model.onnx", "model.onnx.data"):
        assert filecmp.cmp(out / name, tmp_path / "again" / name, shallow=False), name


def test_saved_recipe_records_version_and_calibration_source(tiny_w8a8):
    _, out = tiny_w8a8
    saved = yaml.safe_load((out / "quantization_recipe.yaml").read_text())
    produced = saved["produced_by"]
    assert produced["onnxquant"] == onnxquant.__version__
    assert produced["calibration"]["text"] == "embedded:wiki.valid.tokens" and len(produced["calibration"]["sha256"]) == 64
    assert (produced["calibration"]["samples"], produced["calibration"]["seq_len"]) == (8, 128)


def test_saved_recipe_with_another_calibration_text_is_refused(tiny_models, tiny_w8a8, tmp_path):
    _, out = tiny_w8a8
    other = tmp_path / "other.txt"
    other.write_text("some other calibration text. " * 4000)
    with pytest.raises(onnxquant.UserError, match="not the one this recipe was made with"):
        onnxquant.quantize(tiny_models.onnx("tiny-llama-576"), tmp_path / "x", out / "quantization_recipe.yaml",
                           calibration=other)
    assert not (tmp_path / "x").exists()


def test_non_uniform_recipe_mixes_w8a8_attention_with_4bit_gptq_mlp(tiny_models, tmp_path):
    """Attention MatMuls W8A8 per-channel QDQ, MLP MatMuls 4-bit GPTQ MatMulNBits, in one model."""
    import onnx

    recipe = _tiny(Recipe(stages=(Quantize(
        "INT8_PER_CHANNEL", algorithm=onnxquant.recipes.Algorithm("gptq"),
        overrides=(Override("re:/mlp/", weights=Grid("uint4", "per_block", symmetric=False, block_size=128)),)),)))
    result = onnxquant.quantize(tiny_models.onnx("tiny-llama-576"), tmp_path / "mixed", recipe)
    graph = onnx.load(str(tmp_path / "mixed" / "model.onnx"), load_external_data=False).graph
    nbits = [n.name for n in graph.node if n.op_type == "MatMulNBits"]
    integer = [n for n in graph.node if n.op_type in ("MatMulInteger", "MatMul") and "/attn/" in n.name]
    assert nbits and all("/mlp/" in name for name in nbits)
    assert any(n.op_type == "DequantizeLinear" and "/attn/" in n.name for n in graph.node) and integer
    assert result.quality.ratio < 1.1


def test_override_that_matches_no_node_is_refused(tiny_models, tmp_path):
    recipe = _tiny(Recipe(stages=(Quantize(overrides=(Override("no_such_node", keep_float=True),)),)))
    with pytest.raises(onnxquant.UserError, match="no_such_node"):
        onnxquant.quantize(tiny_models.onnx("tiny-llama-96"), tmp_path / "out", recipe)
    assert not (tmp_path / "out").exists()
