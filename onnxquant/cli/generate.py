"""`onnxquant generate`: greedy generation through ONNX Runtime GenAI, the "does it still talk" check of a
quantized folder. With `--compare OTHER`, OTHER answers the same prompt and the two outputs are printed one
after the other, followed by how far they agree (onnxquant.generation.compare)."""

from __future__ import annotations

import argparse

from onnxquant.cli import HelpFormatter
from onnxquant.errors import fail, run_cli
from onnxquant.generation import DEFAULT_PROMPT


def build_parser(prog: str = "onnxquant generate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="ORT-GenAI model folder")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate at most")
    parser.add_argument("--compare", default=None, metavar="OTHER_DIR", help="a second folder answering the same prompt")
    parser.add_argument("--no_chat_template", action="store_true", help="feed the prompt as raw text")
    return parser


def main(argv: list[str] | None = None, prog: str = "onnxquant generate") -> int:
    from onnxquant.genai_folder import open_genai_folder
    from onnxquant.generation import GreedyGenerator, compare

    args = build_parser(prog).parse_args(argv)
    if args.max_new_tokens < 1:
        fail(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if not args.prompt.strip():
        fail("--prompt is empty; give the text to answer")
    folders = [open_genai_folder(args.model_name_or_path)]
    if args.compare is not None:
        folders.append(open_genai_folder(args.compare))
        if folders[0].vocab_size != folders[1].vocab_size:
            fail(f"{folders[0].path} and {folders[1].path} have different vocabularies ({folders[0].vocab_size} and "
                 f"{folders[1].vocab_size} tokens), so their tokens cannot be compared; compare two versions of one model")
    models = [GreedyGenerator(folder) for folder in folders]
    prompt_ids = models[0].prompt_ids(args.prompt, not args.no_chat_template)
    for folder in folders:
        folder.check_fits_context(len(prompt_ids) + args.max_new_tokens, "the prompt plus --max_new_tokens")
    outputs = [model.generate(prompt_ids, args.max_new_tokens) for model in models]
    for folder, output in zip(folders, outputs):
        print(f"== {folder.path} ({len(output.new_ids)} tokens) ==\n{output.text}\n")
    if len(models) == 2:
        print(f"generate: compare {compare(outputs[0], outputs[1], models[1]).summary()}")
    else:
        print(f"generate: tokens={len(outputs[0].new_ids)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
