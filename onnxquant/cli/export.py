"""`onnxquant export`: a Hugging Face checkpoint (folder, GGUF file, or the embedded SmolLM2-135M-Instruct) -> an
ONNX Runtime GenAI model folder, built by the ORT-GenAI model builder (default) or by Hugging Face optimum
(`--exporter optimum`, a plain ONNX decoder with past key/values)."""

from __future__ import annotations

import argparse
import time

from onnxquant.cli import HelpFormatter
from onnxquant.errors import run_cli


def build_parser(prog: str = "onnxquant export") -> argparse.ArgumentParser:
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


def main(argv: list[str] | None = None, prog: str = "onnxquant export") -> int:
    from onnxquant.api import export

    args = build_parser(prog).parse_args(argv)
    start = time.perf_counter()
    output = export(args.model_path, args.output_path, precision=args.precision,
                    execution_provider=args.execution_provider, exporter=args.exporter,
                    optimum_python=args.optimum_python, overwrite=args.overwrite)
    size_mb = sum(f.stat().st_size for f in output.iterdir() if f.is_file()) / 1e6
    print(f"exported {args.model_path or 'the embedded SmolLM2-135M-Instruct'} to {output} with "
          f"{'optimum' if args.exporter == 'optimum' else 'the ORT-GenAI builder'}: size_mb={size_mb:.1f} "
          f"seconds={time.perf_counter() - start:.1f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
