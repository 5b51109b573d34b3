"""Mixed precision under a measured budget (onnxquant.mixed_precision): allocation, byte model, the search on a
tiny model, the recipe it saves, and the refusals."""

import dataclasses
import hashlib

import numpy as np
import onnx
import pytest

import onnxquant
from onnxquant.errors import UserError
from onnxquant.mixed_precision import (Budget, MeasuredPoint, NodeOptions, PlanSearch, allocate, default_candidates,
                                       stored_bytes)
from onnxquant.recipes import Grid, load_recipe
from onnxquant.schemes import SCHEMES
from onnxquant.spec import QuantSpec

from conftest import run_module

UINT4_B32 = QuantSpec("uint4", "per_block", False, 32)


def _options():
    # Two nodes, two formats each (small and noisy, big and clean): a's upgrade buys more error per byte.
    return [NodeOptions("a", "MatMul", [UINT4_B32, None], [10, 40], [1.0, 0.0]),
            NodeOptions("b", "MatMul", [UINT4_B32, None], [10, 40], [0.1, 0.0])]


def test_allocation_spends_the_budget_where_error_per_byte_falls_most():
    assert allocate(_options(), 20) == [0, 0]
    assert allocate(_options(), 55) == [1, 0]
    assert allocate(_options(), 80) == [1, 1]


def test_allocation_never_exceeds_the_budget():
    rng = np.random.default_rng(0)
    options = [NodeOptions(str(i), "MatMul", [UINT4_B32, None, None], sorted(rng.integers(1, 100, 3)),
                           sorted(rng.random(3), reverse=True)) for i in range(40)]
    smallest = sum(o.sizes[0] for o in options)
    for budget in (smallest + 100, smallest + 1000, smallest + 3000):
        choice = allocate(options, budget)
        assert sum(o.sizes[i] for o, i in zip(options, choice)) <= budget


def test_byte_model_counts_matmulnbits_codes_scales_and_zero_points():
    # K = 576 in blocks of 128 pads to 640: 320 code bytes, 5 float scales and 3 zero-point bytes per column.
    assert stored_bytes("MatMul", QuantSpec("uint4", "per_block", False, 128), 576, 10) == 10 * (320 + 20 + 3)
    assert stored_bytes("MatMul", None, 576, 10) == 4 * 5760
    assert stored_bytes("Gather", QuantSpec("int8", "per_channel"), 576, 10) == 5760 + 40


def test_default_candidates_follow_the_recipe_kind():
    weight_only = [None if s is None else (s.bits, s.block_size) for s in default_candidates(SCHEMES["UINT4_PER_GROUP_ASYM"])]
    assert weight_only == [(4, 128), (4, 64), (4, 32), (8, 128), None]
    w8a8 = [None if s is None else s.granularity for s in default_candidates(SCHEMES["INT8_PER_CHANNEL"])]
    assert w8a8 == ["per_tensor", "per_channel", None]


def test_both_budgets_or_a_zero_budget_are_refused():
    with pytest.raises(UserError, match="not both"):
        Budget(max_delta=0.03, max_size_mb=100)
    with pytest.raises(UserError, match="positive"):
        Budget(max_size_mb=0)


@pytest.fixture(scope="module")
def searched(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "out"
    source = tiny_models.onnx("tiny-llama-96")
    result = onnxquant.quantize(source, out, "w4a16", budget=Budget(max_delta=0.005, windows=2))
    return source, out, result


def test_delta_search_meets_its_budget_on_the_held_out_windows(searched):
    _, _, result = searched
    chosen = result.search.points[result.search.chosen]
    assert chosen.delta <= 0.005
    assert chosen.size_mb == pytest.approx(result.size_mb, abs=0.05)
    assert all(chosen.size_mb <= p.size_mb for p in result.search.points if p.delta <= 0.005)


def test_saved_recipe_writes_the_chosen_mix_again_without_searching(searched, tmp_path):
    source, out, result = searched
    saved = load_recipe(out / "quantization_recipe.yaml")
    assert saved.stages[-1].overrides, "the chosen formats are overrides"
    again = onnxquant.quantize(source, tmp_path / "again", out / "quantization_recipe.yaml")
    assert again.search is None
    digest = [hashlib.sha256((folder / "model.onnx.data").read_bytes()).hexdigest() for folder in (out, tmp_path / "again")]
    assert digest[0] == digest[1]


def test_searched_model_mixes_formats(searched):
    _, out, _ = searched
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    formats = {(n.op_type, next((a.i for a in n.attribute if a.name == "block_size"), 0),
                next((a.i for a in n.attribute if a.name == "bits"), 0)) for n in model.graph.node
               if n.op_type in ("MatMulNBits", "MatMul", "GatherBlockQuantized")}
    assert len(formats) > 1


def test_size_budget_gives_a_model_within_it(searched, tmp_path):
    source, _, first = searched
    sizes = sorted(p.size_mb for p in first.search.points)
    limit = (sizes[0] + sizes[-1]) / 2  # between the all-smallest and the all-largest models
    result = onnxquant.quantize(source, tmp_path / "out", "w4a16", budget=Budget(max_size_mb=limit, windows=1))
    assert result.size_mb <= limit
    assert result.search.points[result.search.chosen].size_mb == pytest.approx(result.size_mb, abs=1e-3)


def test_size_below_every_mix_is_refused_before_any_work(tiny_models, tmp_path):
    with pytest.raises(UserError, match="below the smallest model"):
        onnxquant.quantize(tiny_models.onnx("tiny-llama-96"), tmp_path / "out", "w4a16", budget=Budget(max_size_mb=0.1))
    assert not (tmp_path / "out").exists()


def test_unreachable_delta_names_the_closest_point():
    search = PlanSearch(Budget(max_delta=0.001), load_recipe("w4a16"), verifier=None)
    options = [NodeOptions("a", "MatMul", [UINT4_B32, QuantSpec("uint8", "per_block", False, 128)], [10, 20], [1.0, 0.1])]

    def measure(choice):  # every mix is 2% or more above float
        point = MeasuredPoint(10.0 + 10 * choice[0], 10.2 + 0.1 * (1 - choice[0]) * 10, 10.0, 0.9, {})
        search.result.points.append(point)
        return point

    smallest, largest = [0], [1]
    with pytest.raises(UserError, match=r"closest measured is \+2\.00% at 20\.0 MB"):
        search._within_delta(options, measure, None, (smallest, measure(smallest)), (largest, measure(largest)))


def test_cli_refuses_both_budgets_in_one_line(tiny_models, tmp_path):
    result = run_module("onnxquant.cli.quantize", str(tiny_models.onnx("tiny-llama-96")), str(tmp_path / "out"),
                        "--recipe", "w4a16", "--max_delta", "3%", "--max_size_mb", "1")
    assert result.returncode == 2
    assert "not both" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_budget_with_awq_or_a_4bit_per_channel_candidate_is_refused_before_any_work(tiny_models, tmp_path):
    source, recipe = tiny_models.onnx("tiny-llama-96"), load_recipe("w4a16")
    awq = recipe.with_stage(dataclasses.replace(recipe.stages[-1], algorithm=dataclasses.replace(
        recipe.stages[-1].algorithm, name="awq")))
    with pytest.raises(UserError, match="awq"):
        onnxquant.quantize(source, tmp_path / "out", awq, budget=Budget(max_delta=0.03))
    per_channel = recipe.with_stage(dataclasses.replace(recipe.stages[-1], candidates=(Grid("uint4", "per_channel", False),)))
    with pytest.raises(UserError, match="cannot be written"):
        onnxquant.quantize(source, tmp_path / "out", per_channel, budget=Budget(max_delta=0.03))
    shared = recipe.with_stage(dataclasses.replace(recipe.stages[-1], lowering=dataclasses.replace(
        recipe.stages[-1].lowering, tied_embedding="shared")))
    with pytest.raises(UserError, match="not shared"):
        onnxquant.quantize(source, tmp_path / "out", shared, budget=Budget(max_delta=0.03))
    assert not (tmp_path / "out").exists()
