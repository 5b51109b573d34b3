import json

import pytest

import onnx

from onnxquant.genai_folder import open_genai_folder


def test_tiny_export_is_a_complete_genai_folder(tiny_models):
    folder = open_genai_folder(tiny_models.onnx("tiny-llama-96"))
    assert folder.model_type == "llama"
    assert folder.hidden_size == 96 and folder.num_layers == 2
    assert (folder.path / "tokenizer.json").is_file()
    graph = onnx.load(str(folder.model_file), load_external_data=False).graph
    assert [o.name for o in graph.output][0] == "logits"
    assert not [p for p in folder.path.parent.iterdir() if ".partial-" in p.name], "staging folder left behind"


def test_qwen2_export_keeps_qkv_bias(tiny_models):
    folder = open_genai_folder(tiny_models.onnx("tiny-qwen2-96"))
    graph = onnx.load(str(folder.model_file), load_external_data=False).graph
    assert any(n.op_type == "Add" and "qkv_proj" in n.name for n in graph.node)


@pytest.mark.slow
def test_embedded_smollm2_tokenizer_has_digit_rule_restored(smollm2_onnx):
    from tokenizers import Tokenizer

    spec = json.loads((smollm2_onnx / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
    assert spec["type"] == "Sequence"
    assert spec["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
    tokenizer = Tokenizer.from_file(str(smollm2_onnx / "tokenizer.json"))
    # With llama.cpp's smollm rule the whitespace before a digit stays one token.
    assert tokenizer.encode("\n 1", add_special_tokens=False).tokens == ["ĊĠ", "1"]
    assert tokenizer.encode("a  2023", add_special_tokens=False).tokens == ["a", "ĠĠ", "2", "0", "2", "3"]


@pytest.mark.slow
def test_embedded_smollm2_export_shapes(smollm2_onnx):
    folder = open_genai_folder(smollm2_onnx)
    assert (folder.hidden_size, folder.num_layers, folder.num_heads, folder.num_kv_heads) == (576, 30, 9, 3)
    assert (smollm2_onnx / "model.onnx.data").stat().st_size > 500e6


def test_export_that_cannot_fit_in_memory_is_refused_before_work(tiny_models, tmp_path, monkeypatch):
    import onnxquant
    from onnxquant import staging
    from onnxquant.errors import UserError

    monkeypatch.setattr(staging, "available_memory_bytes", lambda: 300_000_000)  # below the builder's base
    with pytest.raises(UserError, match=r"needs about 0\.5 GB of memory .* the largest model that fits here is about 0\.0 B"):
        onnxquant.export(tiny_models.hf("tiny-llama-96"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_peak_estimate_covers_the_measured_peak():
    from onnxquant.exporter import export_peak_bytes

    # Qwen2.5-Coder-1.5B: 7,108,352,000 bytes of float32 weights, export peak RSS 9,081,652 KiB (ratio 1.31)
    assert 9_081_652 * 1024 <= export_peak_bytes(7_108_352_000) <= 1.1 * 9_081_652 * 1024
