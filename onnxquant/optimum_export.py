"""The second exporter: Hugging Face optimum (package optimum-onnx) writes a plain ONNX decoder with
past key/values; onnxquant adds the genai_config.json and tokenizer that make it an ORT-GenAI folder.

optimum-onnx 0.1.0, the newest release, pins transformers<4.58, while the ORT-GenAI builder this
project exports with needs transformers 5; the two cannot share one environment. optimum therefore
runs in a child process from its own environment (`--optimum_python`), the way the builder already
runs in a child process of this one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from onnxquant.errors import fail

OPTIMUM_PYTHON_ENV = "ONNXQUANT_OPTIMUM_PYTHON"
OPTIMUM_REQUIREMENT = "optimum-onnx[onnxruntime]==0.1.0"  # onnxruntime: optimum fixes dynamic shapes with it
# The commands that make optimum's own environment, run from the checkout (constraints.txt keeps torch on the CPU wheel).
MAKE_OPTIMUM_ENV = (f"python3 -m venv .venv-optimum && .venv-optimum/bin/pip install -c constraints.txt "
                    f"'{OPTIMUM_REQUIREMENT}'")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")
PAST_NAME = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


def optimum_python(flag: str | None) -> str:
    """The interpreter that runs optimum: --optimum_python, else $ONNXQUANT_OPTIMUM_PYTHON, else this one;
    refused in one line when optimum's exporter does not import there."""
    python = flag or os.environ.get(OPTIMUM_PYTHON_ENV) or sys.executable
    if not shutil.which(python) and not Path(python).is_file():
        fail(f"--optimum_python {python} does not exist; make optimum's environment with `{MAKE_OPTIMUM_ENV}` "
             "and pass --optimum_python .venv-optimum/bin/python")
    probe = subprocess.run([python, "-c", "import optimum.exporters.onnx, onnxruntime"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        fail(f"--exporter optimum needs {OPTIMUM_REQUIREMENT}, which does not import with {python} (it pins "
             f"transformers<4.58, so it cannot share onnxquant's environment); make its own with `{MAKE_OPTIMUM_ENV}` "
             "and pass --optimum_python .venv-optimum/bin/python")
    return python


def transformers4_config(config: dict) -> dict:
    """config.json as transformers 4 (optimum's) reads it. transformers 5 moved RoPE settings into
    `rope_parameters` (per layer type for Gemma 3), which transformers 4 ignores, silently falling back
    to theta 10000: SmolLM2 (theta 100000) then exported at perplexity 24.75 instead of 20.82."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return config
    out = dict(config)
    if "full_attention" in rope:
        local = rope.get("sliding_attention", {})
        if "rope_theta" in local:
            out["rope_local_base_freq"] = local["rope_theta"]
        rope = rope["full_attention"]
    params = dict(rope)
    if "rope_theta" in params:
        out["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:
        out["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    out["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
    if "_sliding_window_pattern" in config:
        out["sliding_window_pattern"] = config["_sliding_window_pattern"]
    return out


def _transformers4_checkpoint(hf_dir: Path, work_dir: Path) -> Path:
    """`hf_dir` seen through a transformers 4 config: links to its files beside the rewritten config.json."""
    shadow = work_dir / "hf-transformers4"
    shadow.mkdir()
    for path in hf_dir.iterdir():
        if path.name != "config.json":
            (shadow / path.name).symlink_to(path.absolute())
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("attn_logit_softcapping"):
        # Measured on models/tiny-gemma2-96.json: logits 18% off transformers 5 (the builder's: 4e-4).
        fail(f"optimum-onnx exports {config.get('model_type')} through transformers 4's SDPA attention, which drops its "
             "attention logit soft-capping; export this model with the builder (drop --exporter optimum)")
    (shadow / "config.json").write_text(json.dumps(transformers4_config(config), indent=2), encoding="utf-8")
    return shadow


def optimum_command(python: str, hf_dir: Path, out_dir: Path, work_dir: Path) -> list[str]:
    """The command line of optimum's exporter (task text-generation-with-past) on `hf_dir` seen through a
    transformers 4 config."""
    checkpoint = _transformers4_checkpoint(hf_dir, work_dir)
    return [python, "-m", "optimum.exporters.onnx", "--model", str(checkpoint),
            "--task", "text-generation-with-past", "--device", "cpu", "--dtype", "fp32", str(out_dir)]


def _graph_input_names(model_file: Path) -> list[str]:
    import onnx

    return [value.name for value in onnx.load(str(model_file), load_external_data=False).graph.input]


def _token_id(value) -> int | None:
    return value[0] if isinstance(value, list) and value else value


def genai_config(hf_config: dict, input_names: list[str], filename: str = "model.onnx") -> dict:
    """ORT-GenAI's description of an optimum decoder: the builder's layout, with position_ids among the
    inputs and the KV cache growing by concatenation (optimum's graph returns past + new as present)."""
    layers = int(hf_config["num_hidden_layers"])
    past = {(int(m.group(1)), m.group(2)) for m in map(PAST_NAME.match, input_names) if m}
    expected = {(layer, kind) for layer in range(layers) for kind in ("key", "value")}
    if past != expected or "input_ids" not in input_names:
        fail(f"optimum's graph has inputs {', '.join(input_names[:6])}...; onnxquant expects input_ids and "
             f"past_key_values.<layer>.key/value for {layers} layers (a text-generation-with-past decoder)")
    heads = int(hf_config["num_attention_heads"])
    inputs = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}
    for name in ("attention_mask", "position_ids"):
        if name in input_names:
            inputs[name] = name
    context = int(hf_config.get("max_position_embeddings", 2048))
    eos = _token_id(hf_config.get("eos_token_id"))
    pad = _token_id(hf_config.get("pad_token_id"))
    return {
        "model": {
            "bos_token_id": _token_id(hf_config.get("bos_token_id")),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(hf_config.get("head_dim") or int(hf_config["hidden_size"]) // heads),
                "hidden_size": int(hf_config["hidden_size"]),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": int(hf_config.get("num_key_value_heads") or heads),
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos,
            "type": hf_config["model_type"],
            "vocab_size": int(hf_config["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 50, "top_p": 1.0,
        },
    }


def finish_folder(hf_dir: Path, out_dir: Path) -> None:
    """Make optimum's output an ORT-GenAI folder: genai_config.json and the checkpoint's tokenizer files."""
    hf_config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    config = genai_config(hf_config, _graph_input_names(out_dir / "model.onnx"))
    (out_dir / "genai_config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)
