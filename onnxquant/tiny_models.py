"""Build small randomly initialised Hugging Face checkpoints from the recipes in `models/`.

Each recipe is a JSON file with a `config` (a transformers config), a `seed`, and a description.
The tokenizer is byte-level BPE with no merges (256 byte tokens + 3 specials), so any text
tokenizes without training data. Norm weights are drawn around 1 rather than left at 1, so tests
of norm folding see non-trivial weights. Needs the `export` extra.
"""

from __future__ import annotations

import json
from pathlib import Path

from onnxquant.resources import model_recipe_dir

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def recipe_path(name: str) -> Path:
    return model_recipe_dir() / f"{name}.json"


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def build_tiny_model(name: str, out_dir: str | Path) -> Path:
    """Write the checkpoint of recipe `name` (e.g. "tiny-llama-96") into `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    recipe = json.loads(recipe_path(name).read_text(encoding="utf-8"))
    out_dir = Path(out_dir)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(),
        bos_token=SPECIAL_TOKENS[1], eos_token=SPECIAL_TOKENS[2], unk_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[2],
    )
    config_fields = dict(recipe["config"])
    model_type = config_fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_fields, vocab_size=len(tokenizer),
                                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(recipe["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif param_name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
