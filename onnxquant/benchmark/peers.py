"""Peer quantizers that ship with onnxquant's own dependencies, each writing an ORT-GenAI folder so
onnxquant's validator measures it the same way:

    python -m onnxquant.benchmark.peers ort_rtn_asym|ort_rtn_sym|ort_hqq --input FLOAT_FOLDER --output OUT [--block_size 128]
    python -m onnxquant.benchmark.peers ort_static_int8|ort_static_int8_pc --input FLOAT_FOLDER --output OUT \
        [--calib_data FILE] [--num_calib_data 64] [--seq_len 512]
    python -m onnxquant.benchmark.peers builder_int4 --gguf FILE_OR_EMPTY --output OUT [--block_size 128] [--algo default|k_quant_mixed]
    python -m onnxquant.benchmark.peers builder_kv --input FLOAT_FOLDER --output OUT --kv_scheme int8_per_channel \
        [--gguf FILE_OR_EMPTY] [--calib_data FILE] [--num_calib_data 64] [--seq_len 512]
    python -m onnxquant.benchmark.peers olive_rtn|olive_gptq --input FLOAT_FOLDER --output OUT [--block_size 128] \
        [--gguf FILE_OR_EMPTY] [--calib_data FILE] [--num_calib_data 64] [--seq_len 512]

ort_rtn_*, ort_hqq: onnxruntime.quantization.MatMulNBitsQuantizer on the float export (RTN asymmetric,
RTN symmetric, HQQ), 4 bits, default accuracy level. ort_static_int8(_pc): onnxruntime.quantization's
quantize_static on the float export, W8A8 QDQ with the settings of onnxquant's INT8_TRANSFORMER_DEFAULT
(INT8_PER_CHANNEL for _pc): int8 weights per tensor (per output channel), uint8 asymmetric activations,
moving-average MinMax (onnxquant's averaging constant) over the same calibration windows onnxquant reads,
every MatMul with a constant weight, its output left in float. builder_int4: the ORT-GenAI model
builder's `-p int4` (accuracy level 4, its CPU default) from the Hugging Face checkpoint (the embedded
SmolLM2 GGUF when --gguf is empty). builder_kv: the builder's own KV-cache calibration
(`onnxruntime_genai.models.quantization.kv_cache_calibration`, its defaults: percentile 99.99 per channel, K on
the rotary envelope) run on the float export over the same calibration text and window count, then the builder
rebuilding the float model with `kv_cache_quant_scheme` and that scale file. olive_rtn, olive_gptq: Microsoft Olive (olive-ai 0.13), which does not
install beside onnxquant's pins (its own torch and transformers): tools/olive_peer.py runs under the Python
named by $ONNXQUANT_OLIVE_PYTHON. olive_rtn is its OnnxBlockWiseRtnQuantization on the float export
(symmetric, accuracy level 4, as Olive's defaults); olive_gptq its own Gptq pass (symmetric, on the CPU) on
the Hugging Face checkpoint over the same calibration windows, then the ORT-GenAI builder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from onnxquant.errors import run_cli
from onnxquant.genai_folder import copy_sidecar_files, open_genai_folder
from onnxquant.staging import staged_output_dir

PEERS = ("ort_rtn_asym", "ort_rtn_sym", "ort_hqq", "ort_static_int8", "ort_static_int8_pc", "builder_int4", "builder_kv",
         "olive_rtn", "olive_gptq")
OLIVE_PYTHON = "ONNXQUANT_OLIVE_PYTHON"


def ort_quantize(kind: str, source: Path, output: Path, block_size: int) -> None:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    folder = open_genai_folder(source)
    model = onnx.load(str(folder.model_file))
    if kind == "ort_hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=kind == "ort_rtn_sym")
    quantizer = mnq.MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=kind == "ort_rtn_sym", algo_config=config)
    quantizer.process()
    with staged_output_dir(output) as staging:
        quantizer.model.save_model_to_file(str(staging / "model.onnx"), use_external_data_format=True)
        copy_sidecar_files(folder, staging)


def ort_static_int8(source: Path, output: Path, calib_data: Path | None, count: int, seq_len: int, per_channel: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from onnxquant.calibration import token_sample_reader
    from onnxquant.data import calibration_windows, resolve_text
    from onnxquant.schemes import Calibration

    folder = open_genai_folder(source)
    samples = calibration_windows(folder.path, resolve_text(calib_data, None, "validation"), count, seq_len)
    # ORT's default also puts a Q/DQ pair on every MatMul output (SmolLM2: 67.20 per tensor against 36.96
    # without); onnxquant quantizes MatMul inputs only, so the peer compares W8A8 with W8A8.
    options = {"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul"], "CalibMovingAverage": True,
               "CalibMovingAverageConstant": Calibration().averaging_constant, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
    with staged_output_dir(output) as staging:
        quantize_static(str(folder.model_file), str(staging / "model.onnx"), token_sample_reader(folder.model_file, folder, samples),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
                        calibrate_method=CalibrationMethod.MinMax, extra_options=options)
        copy_sidecar_files(folder, staging)


def builder_int4(gguf: str, output: Path, block_size: int, algo: str) -> None:
    # ORT-GenAI 0.18 ignores the old `int4_`-prefixed algo names (the model came out at block 32).
    options = [f"block_size={block_size}", *([f"algo_config={algo}"] if algo != "default" else [])]
    with staged_output_dir(output) as staging, tempfile.TemporaryDirectory() as work:
        _run_builder(_hf_checkpoint(gguf, Path(work)), staging, Path(work), "int4", options)


def _run_builder(hf: Path, output: Path, work: Path, precision: str, options: list[str]) -> None:
    """The ORT-GenAI model builder on the CPU: `hf` -> `output` at `precision` with its --extra_options."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(output), "-p", precision,
               "-e", "cpu", "-c", str(work / "cache"), "--extra_options", *options]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def _hf_checkpoint(gguf: str, work: Path) -> Path:
    from onnxquant.checkpoint import gguf_to_hf_folder, resolve_model_source

    source = resolve_model_source(gguf or None)
    if source.kind != "gguf":
        return source.path
    gguf_to_hf_folder(source.path, work / "hf")
    return work / "hf"


def builder_kv(source: Path, gguf: str, output: Path, scheme: str, calib_data: Path | None, count: int, seq_len: int) -> None:
    from onnxruntime_genai.models.quantization.kv_cache_calibration import calibrate_kv_scales

    from onnxquant.data import resolve_text

    folder = open_genai_folder(source)
    with staged_output_dir(output) as staging, tempfile.TemporaryDirectory() as work:
        scales = Path(work) / "kv_scales.json"
        calibrate_kv_scales(str(folder.model_file), str(folder.path), str(scales), quant_type=scheme, target_seq=seq_len,
                            num_seqs=count, corpus=[resolve_text(calib_data, None, "validation")])
        _run_builder(_hf_checkpoint(gguf, Path(work)), staging, Path(work), "fp32",
                     [f"kv_cache_quant_scheme={scheme}", f"kv_cache_scale_file={scales}"])


def olive(kind: str, source: Path, gguf: str, output: Path, block_size: int, calib_data: Path | None, count: int,
          seq_len: int) -> None:
    import os

    from onnxquant.data import resolve_text
    from onnxquant.errors import fail

    python = os.environ.get(OLIVE_PYTHON, "")
    if not python or not Path(python).is_file():
        fail(f"{kind}: Olive runs in a venv of its own; set {OLIVE_PYTHON} to its python (olive-ai 0.13; "
             "docs/guide/install.md, 'Olive beside the benchmark')")
    script = Path(__file__).resolve().parents[2] / "tools" / "olive_peer.py"
    with staged_output_dir(output) as staging, tempfile.TemporaryDirectory() as work:
        command = [python, str(script), kind.removeprefix("olive_"), "--onnx", str(source), "--output", str(staging),
                   "--block_size", str(block_size), "--overwrite"]
        if kind == "olive_gptq":
            hf = _hf_checkpoint(gguf, Path(work))
            text = Path(work) / "calibration.txt"
            text.write_text(resolve_text(calib_data, None, "validation"), encoding="utf-8")
            command += ["--hf", str(hf), "--calib_text", str(text), "--num_calib_data", str(count), "--seq_len", str(seq_len)]
        run = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if run.returncode != 0:
            errors = [line for line in run.stderr.splitlines() if "error" in line.lower()] or run.stderr.splitlines()[-1:]
            fail(f"{kind}: {(errors or ['exit ' + str(run.returncode)])[-1].strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("--input", type=Path, help="float ORT-GenAI folder (ort_*)")
    parser.add_argument("--gguf", default="", help="GGUF or HF folder for builder_int4 (default: the embedded model)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--kv_scheme", default="int8_per_channel",
                        choices=[f"{dtype}_{granularity}" for dtype in ("int8", "int4") for granularity in ("per_tensor", "per_channel")],
                        help="builder_kv: its kv_cache_quant_scheme (the CPU's: int8 or int4)")
    parser.add_argument("--algo", default="default", help="builder_int4: its algo_config (default, k_quant_mixed, ...)")
    parser.add_argument("--calib_data", type=Path, help="ort_static_*: calibration text (default: the embedded validation split)")
    parser.add_argument("--num_calib_data", type=int, default=64, help="ort_static_*: calibration windows")
    parser.add_argument("--seq_len", type=int, default=512, help="ort_static_*: tokens per window")
    args = parser.parse_args(argv)
    if args.peer == "builder_int4":
        builder_int4(args.gguf, args.output, args.block_size, args.algo)
    elif args.peer == "builder_kv":
        builder_kv(args.input, args.gguf, args.output, args.kv_scheme, args.calib_data, args.num_calib_data, args.seq_len)
    elif args.peer.startswith("olive_"):
        olive(args.peer, args.input, args.gguf, args.output, args.block_size, args.calib_data, args.num_calib_data,
              args.seq_len)
    elif args.peer.startswith("ort_static_int8"):
        ort_static_int8(args.input, args.output, args.calib_data, args.num_calib_data, args.seq_len, args.peer.endswith("_pc"))
    else:
        ort_quantize(args.peer, args.input, args.output, args.block_size)
    return 0


if __name__ == "__main__":
    run_cli(main)
