"""`python -m onnxquant.export`: a Hugging Face checkpoint (folder, GGUF file, or the embedded
SmolLM2-135M-Instruct) -> an ONNX Runtime GenAI model folder, built by the ORT-GenAI model builder
(default) or by Hugging Face optimum (`--exporter optimum`, a plain ONNX decoder with past key/values)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from onnxquant.checkpoint import ModelSource, float32_export_bytes, gguf_to_hf_folder, resolve_model_source
from onnxquant.cli import HelpFormatter
from onnxquant.errors import fail, run_cli
from onnxquant.optimum_export import finish_folder, optimum_command, optimum_python
from onnxquant.staging import check_output_dir, claimed_output, owned_temp_dir, require_free_space, staged_output_dir

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


def export_model(source: ModelSource, output: Path, precision: str = "fp32", execution_provider: str = "cpu",
                 optimum: str | None = None) -> float:
    """Export `source` into the new folder `output` with the builder, or with optimum when `optimum` names
    the interpreter that runs it; returns the wall seconds it took."""
    start = time.perf_counter()
    with staged_output_dir(output) as staging, owned_temp_dir(".onnxquant-export-", output.absolute().parent) as work:
        work_dir = Path(work)
        if source.kind == "gguf":
            hf_dir = work_dir / "hf"
            print(f"dequantizing {source.path.name} to a float checkpoint ...", flush=True)
            gguf_to_hf_folder(source.path, hf_dir)
        else:
            hf_dir = source.path
        if optimum is not None:
            print("exporting the ONNX model with optimum (fp32, cpu) ...", flush=True)
            _run_logged(optimum_command(optimum, hf_dir, staging, work_dir), work_dir / "optimum.log",
                        "optimum's ONNX exporter")
            finish_folder(hf_dir, staging)
        else:
            print(f"building the ONNX model with the ORT-GenAI model builder ({precision}, {execution_provider}) ...", flush=True)
            _run_logged(_builder_command(hf_dir, staging, precision, execution_provider, work_dir),
                        work_dir / "builder.log", "the ORT-GenAI model builder")
        missing = [name for name in GENAI_FOLDER_FILES if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"the exporter wrote no {', '.join(missing)}")
    return time.perf_counter() - start


def build_parser(prog: str = "python -m onnxquant.export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model_path", default=None,
                        help="Hugging Face checkpoint folder or .gguf file (default: the embedded SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--output_path", required=True, help="new folder for the ORT-GenAI model")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--execution_provider", choices=("cpu", "cuda", "dml"), default="cpu",
                        help="device the model is built for (fp16 needs cuda or dml)")
    parser.add_argument("--exporter", choices=("builder", "optimum"), default="builder",
                        help="builder: the ORT-GenAI model builder (fused contrib ops); optimum: Hugging Face optimum's "
                             "plain ONNX decoder with past key/values (fp32, cpu)")
    parser.add_argument("--optimum_python", default=None,
                        help="Python of an environment with optimum-onnx, which pins transformers<4.58 and so lives "
                             "apart from onnxquant's (default: $ONNXQUANT_OPTIMUM_PYTHON, else this Python)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_path")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m onnxquant.export") -> int:
    args = build_parser(prog).parse_args(argv)
    source = resolve_model_source(args.model_path)
    output = Path(args.output_path)
    with claimed_output(output):
        return _export(args, source, output)


def _export(args, source, output: Path) -> int:
    check_output_dir(output, [source.path], args.overwrite)
    require_free_space(output, float32_export_bytes(source), f"exporting {source.path.name}")
    optimum = None
    if args.exporter == "optimum":
        if (args.precision, args.execution_provider) != ("fp32", "cpu"):
            fail("--exporter optimum writes fp32 models for the CPU; drop --precision and --execution_provider")
        optimum = optimum_python(args.optimum_python)
    elif args.optimum_python is not None:
        fail("--optimum_python applies to --exporter optimum; add --exporter optimum or drop it")
    if args.precision == "fp16" and args.execution_provider == "cpu":
        fail("the ORT-GenAI builder makes fp16 models only for cuda or dml; use --precision fp32 for the CPU")
    seconds = export_model(source, output, args.precision, args.execution_provider, optimum)
    size_mb = sum(f.stat().st_size for f in output.iterdir() if f.is_file()) / 1e6
    print(f"exported {source.architecture} from {source.path} to {output} with {'optimum' if optimum else 'the ORT-GenAI builder'}: size_mb={size_mb:.1f} seconds={seconds:.1f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
