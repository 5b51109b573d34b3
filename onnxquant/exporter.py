"""Export: a Hugging Face checkpoint (folder, GGUF file, or the embedded SmolLM2-135M-Instruct) -> an
ONNX Runtime GenAI model folder, built by the ORT-GenAI model builder (default) or by Hugging Face
optimum (a plain ONNX decoder with past key/values). `onnxquant.export` is the public entry point."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

from onnxquant.checkpoint import ModelSource, gguf_to_hf_folder
from onnxquant.optimum_export import finish_folder, optimum_command
from onnxquant.staging import owned_temp_dir, staged_output_dir

log = logging.getLogger(__name__)

BUILDER_MODULE = "onnxquant.builder_compat"  # the ORT-GenAI builder, adapted to transformers 5 configs
GENAI_FOLDER_FILES = ("model.onnx", "genai_config.json", "tokenizer.json")


def _run_logged(command: list[str], log_path: Path, what: str) -> None:
    """Run an exporter in a child process, its chatter kept in `log_path`; on failure its last lines go to stderr."""
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise RuntimeError(f"{what} failed (exit {result.returncode}); its last lines are above")


def _builder_command(hf_dir: Path, out_dir: Path, precision: str, execution_provider: str, work_dir: Path) -> list[str]:
    return [sys.executable, "-m", BUILDER_MODULE, "-i", str(hf_dir), "-o", str(out_dir),
            "-p", precision, "-e", execution_provider, "-c", str(work_dir / "cache")]


# Peak RSS of a builder export, measured: Qwen2.5-Coder-1.5B (7.11 GB of float32 weights) 9.30 GB (1.31x);
# the base covers the interpreter, torch and ORT.
EXPORT_PEAK_RATIO = 1.31
EXPORT_PEAK_BASE = 0.5e9


def export_peak_bytes(model_bytes: int) -> int:
    """About the peak memory of exporting a model of `model_bytes` float32 weights."""
    return int(EXPORT_PEAK_BASE + EXPORT_PEAK_RATIO * model_bytes)


def export_model(source: ModelSource, output: Path, precision: str = "fp32", execution_provider: str = "cpu",
                 optimum: str | None = None) -> float:
    """Export `source` into the new folder `output` with the builder, or with optimum when `optimum` names
    the interpreter that runs it; returns the wall seconds it took."""
    start = time.perf_counter()
    with staged_output_dir(output) as staging, owned_temp_dir(".onnxquant-export-", output.absolute().parent) as work:
        work_dir = Path(work)
        if source.kind == "gguf":
            hf_dir = work_dir / "hf"
            log.info("dequantizing %s to a float checkpoint ...", source.path.name)
            gguf_to_hf_folder(source.path, hf_dir)
        else:
            hf_dir = source.path
        if optimum is not None:
            log.info("exporting the ONNX model with optimum (fp32, cpu) ...")
            _run_logged(optimum_command(optimum, hf_dir, staging, work_dir), work_dir / "optimum.log",
                        "optimum's ONNX exporter")
            finish_folder(hf_dir, staging)
        else:
            log.info("building the ONNX model with the ORT-GenAI model builder (%s, %s) ...", precision, execution_provider)
            _run_logged(_builder_command(hf_dir, staging, precision, execution_provider, work_dir),
                        work_dir / "builder.log", "the ORT-GenAI model builder")
        missing = [name for name in GENAI_FOLDER_FILES if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"the exporter wrote no {', '.join(missing)}")
    return time.perf_counter() - start
