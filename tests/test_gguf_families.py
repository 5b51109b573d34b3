"""GGUF files of every family both transformers' GGUF reader and onnxquant's export read: a float32 GGUF
written from each tiny recipe the way llama.cpp's converter writes it exports to the same model as the
recipe's HF folder; a GGUF of any other architecture is refused in one line naming the accepted ones."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from onnxquant.checkpoint import gguf_architectures, gguf_to_hf_folder, resolve_model_source, restore_gguf_settings
from onnxquant.errors import UserError
from onnxquant.exporter import export_model

from conftest import assert_user_error, prefill_logits, relative_logit_error, run_module

# With transformers 5.25 / gguf 0.19. transformers also reads "mistral" GGUF config keys, but gguf-py has
# no such architecture to name its tensors (llama.cpp writes Mistral as "llama"), and no GGUF reader for
# "gemma" (Gemma 1); the rest of what it reads onnxquant does not export.
ACCEPTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# recipe of each newly accepted family -> the architecture its GGUF loads as
FAMILIES = {"tiny-qwen3-96": "Qwen3ForCausalLM", "tiny-gemma2-96": "Gemma2ForCausalLM",
            "tiny-gemma3-96": "Gemma3ForCausalLM"}

# HF model type -> the `general.architecture` llama.cpp's convert_hf_to_gguf.py writes for it
LLAMA_CPP_ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                          "gemma2": "gemma2", "gemma3_text": "gemma3"}
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3


def _llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rotary halves interleaved (transformers undoes it on reading)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_float_gguf(hf_dir: Path, out_path: Path) -> Path:
    """Write the HF checkpoint `hf_dir` as a float32 GGUF: llama.cpp's metadata keys and tensor names (gguf-py's
    table, the one transformers reads them back through), Llama's q/k permutation, Gemma's norms stored as w + 1,
    no output.weight when the embeddings are tied, and the byte-level vocabulary as a "gpt2" tokenizer."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    arch = LLAMA_CPP_ARCHITECTURE[config.model_type]
    model_arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)  # Gemma 3: the global layers'

    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(hf_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.sliding_window)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)

    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TOKEN_CONTROL if i in special else TOKEN_NORMAL for i in range(len(tokens))])
    writer.add_token_scores([0.0] * len(tokens))  # no merges to write: transformers derives them (none) from these
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)

    for hf_name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base)
        assert name is not None, f"gguf-py has no {arch} name for {hf_name}"
        data = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.endswith(".attn_q"):
            data = _llama_permute(data, config.num_attention_heads)
        elif arch == "llama" and name.endswith(".attn_k"):
            data = _llama_permute(data, config.num_key_value_heads)
        elif arch in ("gemma2", "gemma3") and name.endswith("norm"):
            data = data + 1.0
        writer.add_tensor(f"{name}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def write_header_only_gguf(out_path: Path, arch: str) -> Path:
    """A GGUF with metadata and no tensors: enough for the architecture check to read."""
    import gguf

    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


@pytest.fixture(scope="module")
def gguf_exports(tiny_models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """recipe -> (its HF folder's export, its GGUF's export). The exports (about 6 s each, most of it the
    builder's imports) run side by side; the HF folders are built first, one by one, as their seeds need."""
    root = tmp_path_factory.mktemp("gguf-families")
    sources = {}
    for name in FAMILIES:
        sources[name] = resolve_model_source(str(write_float_gguf(tiny_models.hf(name), root / f"{name}.gguf")))
        assert sources[name].architecture == FAMILIES[name]
    # The HF folders' exports first, then the GGUFs': a GGUF's conversion builds its model on the meta device,
    # which met a builder loading another model beside it (meta tensors in save_pretrained).
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        for job in [pool.submit(tiny_models.onnx, name) for name in sources]:
            job.result()
        for job in [pool.submit(export_model, source, root / f"{name}-onnx") for name, source in sources.items()]:
            job.result()
    return {name: (tiny_models.onnx(name), root / f"{name}-onnx") for name in FAMILIES}


def test_accepted_gguf_architectures():
    assert gguf_architectures() == ACCEPTED


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gguf_export_matches_hf_folder_export(gguf_exports, name):
    hf_export, gguf_export = gguf_exports[name]
    ids = (np.arange(12) * 37) % 250 + 3
    error = relative_logit_error(prefill_logits(hf_export, ids), prefill_logits(gguf_export, ids))
    assert error < 1e-4, error


def test_gemma3_linear_rope_scaling_survives_the_gguf(tiny_models, tmp_path):
    """Gemma 3 4B-27B scale the global layers' RoPE linearly; transformers' GGUF reader drops the file's
    rope.scaling keys, which onnxquant puts back. Six layers, so one is global (llama.cpp fixes the pattern
    at 6); checked in torch, as the builder then reads the same config as from an HF folder."""
    import json
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    hf = tmp_path / "hf"
    shutil.copytree(tiny_models.hf("tiny-gemma3-96"), hf)
    fields = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    fields.pop("layer_types")
    fields["num_hidden_layers"] = 6
    fields["rope_parameters"]["full_attention"].update(rope_type="linear", factor=8.0)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(Gemma3TextConfig.from_dict(fields), dtype=torch.float32).eval()
    assert reference.config.layer_types[5] == "full_attention"
    reference.save_pretrained(hf)
    gguf_to_hf_folder(write_float_gguf(hf, tmp_path / "g.gguf"), tmp_path / "from-gguf")
    ids = torch.from_numpy((np.arange(64) * 37) % 250 + 3)[None]
    with torch.no_grad():
        expected = reference(ids).logits.numpy()
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "from-gguf", dtype=torch.float32).eval()(ids).logits.numpy()
    assert relative_logit_error(expected, got) < 1e-5


@pytest.mark.parametrize("arch,layers,scalar", [("gemma2", 46, 144), ("gemma2", 26, 128), ("gemma3", 62, 144),
                                                ("gemma3", 34, 128)])
def test_gemma_query_scale_follows_llama_cpp(arch, layers, scalar):
    """llama.cpp scales Gemma queries by 1/sqrt(head_dim), but the 27B models' (46 / 62 layers) by 1/sqrt(hidden/heads)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model({"gemma2": "gemma2", "gemma3": "gemma3_text"}[arch], hidden_size=4608,
                                  num_attention_heads=32, head_dim=256, num_hidden_layers=layers)
    restore_gguf_settings(config, {"general.architecture": arch, f"{arch}.attention.key_length": 128})
    assert (config.head_dim, config.query_pre_attn_scalar) == (128, scalar)


@pytest.mark.parametrize("arch", ["gemma", "mistral", "gemma4", "qwen35", "falcon"])
def test_unreadable_gguf_architecture_is_refused(tmp_path, arch):
    with pytest.raises(UserError, match=f"unsupported GGUF architecture '{arch}'"):
        resolve_model_source(str(write_header_only_gguf(tmp_path / f"{arch}.gguf", arch)))


def test_export_refuses_unsupported_gguf_in_one_line(tmp_path):
    gguf_path = write_header_only_gguf(tmp_path / "gemma.gguf", "gemma")
    result = run_module("onnxquant.cli.export", "--model_path", str(gguf_path), "--output_path", str(tmp_path / "out"))
    assert_user_error(result, "unsupported GGUF architecture 'gemma'", ", ".join(sorted(ACCEPTED)))
    assert not (tmp_path / "out").exists()
