"""FP8 E4M3 QDQ and the microscaling formats (MXFP8, MXFP4, NVFP4): grids, the two written forms, end to end."""

import dataclasses

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from onnxquant.emitters.dynamic_microscaling import emit_activation_microscaling
from onnxquant.genai_folder import open_genai_folder
from onnxquant.passes import EmulateMicroscalingPass, QuantizeGraphPass
from onnxquant.plan import plan_quantization
from onnxquant.schemes import get_scheme, mxfp4_blocks, mxfp8_blocks, nvfp4_blocks
from onnxquant.spec import QuantSpec, float_block_scale, round_to_nearest
from onnxquant.evaluation import eval_windows, evaluate_perplexity

from conftest import assert_user_error, run_module


def _matmul_model(weight: np.ndarray) -> ir.Model:
    k, n = weight.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3, k]))
    w = ir.Value(name="w", const_value=ir.tensor(weight, name="w"), type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([k, n]))
    matmul = ir.node("MatMul", [x, w], name="mm")
    matmul.outputs[0].name, matmul.outputs[0].dtype, matmul.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([3, n])
    return ir.Model(ir.Graph([x], [matmul.outputs[0]], nodes=[matmul], initializers=[w], opset_imports={"": 25}, name="g"),
                    ir_version=11)


@pytest.mark.parametrize("scheme", ["MXFP8_A16", "MXFP4_A16", "NVFP4_A16"])
def test_standard_and_cpu_forms_compute_identical_weights(scheme):
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((128, 24)) * np.exp(rng.standard_normal((128, 1)))).astype(np.float32)
    model = _matmul_model(weight)
    QuantizeGraphPass(plan_quantization(model.graph, get_scheme(scheme)), {}, {})(model)
    standard = ir.serde.serialize_model(model)
    onnx.checker.check_model(standard)
    x = np.eye(128, dtype=np.float32)[:3]
    oracle = ReferenceEvaluator(standard).run(None, {"x": x})[0]  # rows of the dequantized weight
    EmulateMicroscalingPass()(model)
    model.opset_imports[""], model.ir_version = 22, 10
    cpu = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(cpu.run(None, {"x": x})[0], oracle)
    assert not np.array_equal(oracle, weight[:3])  # it did quantize


def test_e8m0_scales_are_ocp_powers_of_two():
    spec = QuantSpec("float4e2m1", "per_block", block_size=32, scale_dtype="e8m0")
    bound = np.array([6.0, 4.0, 7.9, 0.3])
    scale = float_block_scale(bound, spec)
    np.testing.assert_array_equal(scale, 2.0 ** (np.floor(np.log2(bound)) - 2))
    assert np.all(np.log2(scale) == np.round(np.log2(scale)))


def test_fp4_codes_are_e2m1_values():
    weight = np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32)
    quantized = round_to_nearest(weight, QuantSpec("float4e2m1", "per_block", block_size=16, scale_dtype="e4m3"))
    values = set(np.abs(quantized.codes.astype(np.float32)).ravel().tolist())
    assert values <= {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    assert quantized.scale.astype(ml_dtypes.float8_e4m3fn).astype(np.float32).tolist() == quantized.scale.tolist()


@pytest.mark.parametrize("flags", [("--config", "FP8_E4M3", "--include_rotation", "--include_sq"),
                                   ("--config", "FP8_E4M3_PER_CHANNEL"),
                                   ("--config", "NVFP4_A16", "--algo", "gptq"),
                                   ("--config", "MXFP8_A16"),
                                   ("--config", "MXFP8", "--hadamard_group_size", "32")])
def test_fp8_and_microscaling_models_run_in_ort_genai_near_float(tiny_models, tmp_path, test_text, flags):
    source = tiny_models.onnx("tiny-llama-96")
    out = tmp_path / "q"
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(source), "--output_model_path", str(out),
                        "--num_calib_data", "8", "--seq_len", "128", "--use_moving_average", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    windows = eval_windows(open_genai_folder(source), test_text[:20000], 128, 4)
    float_ppl = evaluate_perplexity(open_genai_folder(source), windows, "genai", progress=False).perplexity
    quant_ppl = evaluate_perplexity(open_genai_folder(out), windows, "genai", progress=False).perplexity
    assert abs(quant_ppl / float_ppl - 1) < 0.05, (quant_ppl, float_ppl)
    if "NVFP4_A16" in flags:
        assert (out / "model.standard.onnx").is_file() and "standard_size_mb=" in result.stdout


def test_block_size_that_does_not_divide_k_names_the_node(tiny_models, tmp_path):
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                        "--output_model_path", str(tmp_path / "q"), "--config", "MXFP4_A16", "--block_size", "64")
    assert_user_error(result, "K = 96 is not a multiple of the block size 64", "/MatMul")
    assert not (tmp_path / "q").exists()


RCEIL = {"scale_rounding": "rceil"}


@pytest.mark.parametrize("spec", [mxfp8_blocks(), mxfp4_blocks(), nvfp4_blocks(), dataclasses.replace(mxfp8_blocks(), **RCEIL),
                                  dataclasses.replace(mxfp4_blocks(), **RCEIL)],
                         ids=["mxfp8", "mxfp4", "nvfp4", "mxfp8-rceil", "mxfp4-rceil"])
def test_run_time_activation_blocks_equal_offline_rounding(spec):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 64)) * np.exp(2 * rng.standard_normal((5, 1)))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, 3] = 2.0 ** 5  # exact powers of two, where log2 rounding would matter
    x[2, 40] = -(2.0 ** -3)
    x[3, 7] = 500.0 * 2.0 ** -6  # a block whose OCP scale saturates its largest value
    model = _matmul_model(np.eye(64, dtype=np.float32))
    model.graph.inputs[0].shape = model.graph.outputs[0].shape = ir.Shape([5, 64])
    matmul = next(iter(model.graph))
    emit_activation_microscaling(model.graph, [matmul], "x", spec)
    model.opset_imports[""], model.ir_version = 22, 10
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = round_to_nearest(x.T, spec).dequantize().T
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)
    assert not np.array_equal(expected, x)


@pytest.mark.parametrize("blocks", [mxfp8_blocks, mxfp4_blocks], ids=["mxfp8", "mxfp4"])
def test_rceil_scales_never_saturate_and_floor_ones_do(blocks):
    amax = np.exp2(np.linspace(-4.0, 4.0, 4001))
    floor_spec, rceil_spec = blocks(), dataclasses.replace(blocks(), **RCEIL)
    floor, rceil = float_block_scale(amax, floor_spec), float_block_scale(amax, rceil_spec)
    assert np.all(amax / rceil <= rceil_spec.qmax)
    assert np.any(amax / floor > floor_spec.qmax)
    assert np.all((rceil == floor) | (rceil == 2 * floor))


def test_mx_scale_rounding_needs_an_mx_scheme(tiny_models, tmp_path):
    result = run_module("onnxquant.cli.quantize", "--input_model_path", str(tiny_models.onnx("tiny-llama-96")),
                        "--output_model_path", str(tmp_path / "q"), "--config", "INT8_PER_CHANNEL", "--mx_scale_rounding", "rceil")
    assert_user_error(result, "--mx_scale_rounding applies to the MX schemes", "not INT8_PER_CHANNEL")
    assert not (tmp_path / "q").exists()
