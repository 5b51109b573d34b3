"""An ORT-GenAI model folder: genai_config.json, the decoder ONNX file, and the tokenizer."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from onnxquant.errors import fail

# Files besides the ONNX model and its external data that make a folder loadable by ORT-GenAI.
SIDECAR_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")


@dataclass(frozen=True)
class GenAIFolder:
    path: Path
    config: dict

    @property
    def decoder(self) -> dict:
        return self.config["model"]["decoder"]

    @property
    def model_file(self) -> Path:
        return self.path / self.decoder["filename"]

    @property
    def model_type(self) -> str:
        return self.config["model"]["type"]

    @property
    def num_layers(self) -> int:
        return int(self.decoder["num_hidden_layers"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.decoder["num_key_value_heads"])

    @property
    def num_heads(self) -> int:
        return int(self.decoder["num_attention_heads"])

    @property
    def head_size(self) -> int:
        return int(self.decoder["head_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.decoder["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["model"]["vocab_size"])

    @property
    def sliding_window(self) -> int:
        """The local attention window of the sliding layers (0: none)."""
        return int(self.decoder.get("sliding_window", {}).get("window_size", 0))

    @property
    def context_length(self) -> int:
        return int(self.config["model"]["context_length"])

    def check_fits_context(self, tokens: int, what: str) -> None:
        """Refuse, before any work, a run of `tokens` tokens longer than the model's context."""
        if tokens > self.context_length:
            fail(f"{what} is {tokens} tokens, longer than the model's context of {self.context_length} tokens "
                 f"(context_length in {self.path / 'genai_config.json'}); pass at most {self.context_length}")

    def kv_capacity(self, tokens: int) -> int:
        """KV cache length (ORT-GenAI's max_length) for a run of `tokens` tokens. ORT's
        GroupQueryAttention refuses a cache shorter than the sliding window (Gemma 2/3), whatever
        the run's length, so such a model's cache is never shorter than its window."""
        return max(tokens, self.sliding_window)

    def past_names(self) -> list[str]:
        inputs = self.decoder["inputs"]
        names = []
        for layer in range(self.num_layers):
            names.append(inputs["past_key_names"] % layer)
            names.append(inputs["past_value_names"] % layer)
        return names


# Microscaling models: the standard ONNX form is written beside the CPU-runnable model.onnx under this
# suffix (model.standard.onnx), with its own external data.
STANDARD_SUFFIX = ".standard.onnx"


def standard_model_name(model_name: str) -> str:
    return Path(model_name).stem + STANDARD_SUFFIX


def model_bytes(directory: Path, model_name: str) -> int:
    """Bytes on disk of `model_name` in `directory` and its external data files (`<name>.data`, ...)."""
    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.name.startswith(model_name))


def check_model_file(model_file: Path) -> None:
    """Refuse a model.onnx that does not parse, or whose external data files are missing or short."""
    import onnx

    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises its own types
        fail(f"{model_file} is not a readable ONNX model ({type(exc).__name__}); re-export the model")
    ends: dict[str, int] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            ends[info["location"]] = max(ends.get(info["location"], 0), end)
    for location, end in ends.items():
        data = model_file.parent / location
        size = data.stat().st_size if data.is_file() else -1
        if size < end:
            state = "missing" if size < 0 else f"truncated ({size:,} bytes, {end:,} needed)"
            fail(f"{data} is {state}; copy the complete model folder or re-export the model")


def open_genai_folder(path: str | Path) -> GenAIFolder:
    folder = Path(path)
    if folder.is_file() and folder.suffix == ".onnx":
        folder = folder.parent
    if not folder.is_dir():
        fail(f"{folder} is not a folder; pass an ORT-GenAI model folder made by `onnxquant export`")
    config_path = folder / "genai_config.json"
    if not config_path.is_file():
        fail(f"{folder} has no genai_config.json; pass an ORT-GenAI model folder made by `onnxquant export`")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = config["model"]["decoder"]
        decoder["filename"], decoder["num_hidden_layers"], decoder["head_size"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        fail(f"{config_path} is not a valid ORT-GenAI config ({exc!r}); re-export the model")
    result = GenAIFolder(folder, config)
    if not result.model_file.is_file():
        fail(f"{folder} has no {result.model_file.name}; the folder is incomplete, re-export the model")
    check_model_file(result.model_file)
    if not (folder / "tokenizer.json").is_file():
        fail(f"{folder} has no tokenizer.json; copy the model's tokenizer files into it")
    return result


def copy_sidecar_files(source: GenAIFolder, destination: Path, model_name: str | None = None) -> None:
    """Copy genai_config.json, tokenizer and chat-template files; not the ONNX model or its data.
    With `model_name` other than the source's, genai_config.json names that file instead."""
    for item in source.path.iterdir():
        if item.is_file() and item.suffix in SIDECAR_SUFFIXES:
            shutil.copy2(item, destination / item.name)
    if model_name is not None and model_name != source.model_file.name:
        config = copy.deepcopy(source.config)
        config["model"]["decoder"]["filename"] = model_name
        (destination / "genai_config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
