"""Each user mistake ends in one `error:` line, exit code 2, no traceback and no output written."""

import json

import pytest

from conftest import assert_user_error, run_module


def _export(*args):
    return run_module("onnxquant.cli.export", *args)


def test_export_missing_model_path(tmp_path):
    result = _export("--model_path", str(tmp_path / "nope"), "--output_path", str(tmp_path / "out"))
    assert_user_error(result, "does not exist")
    assert not (tmp_path / "out").exists()


def test_export_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(_export("--model_path", str(tmp_path / "empty"), "--output_path", str(tmp_path / "out")), "no config.json")


def test_export_unsupported_architecture(tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    (model / "tokenizer.json").write_text("{}")
    assert_user_error(_export("--model_path", str(model), "--output_path", str(tmp_path / "out")),
                      "unsupported architecture 'GPT2LMHeadModel'")
    assert not (tmp_path / "out").exists()


def test_export_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    assert_user_error(_export("--model_path", str(bad), "--output_path", str(tmp_path / "out")), "not a readable GGUF file")


def test_export_refuses_non_empty_output(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _export("--model_path", str(tiny_models.hf("tiny-llama-96")), "--output_path", str(out))
    assert_user_error(result, "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_export_refuses_output_equal_to_input(tiny_models):
    model = tiny_models.hf("tiny-llama-96")
    before = sorted(p.name for p in model.iterdir())
    assert_user_error(_export("--model_path", str(model), "--output_path", str(model)), "overlaps the input")
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.parametrize("missing", ["genai_config.json", "model.onnx"])
def test_validate_incomplete_folder(tiny_models, tmp_path, test_text_path, missing):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_models.onnx("tiny-llama-96"), folder)
    (folder / missing).unlink()
    result = run_module("onnxquant.cli.validate", "--model_name_or_path", str(folder), "--dataset_path", str(test_text_path))
    assert_user_error(result, missing)


def test_validate_text_too_short(tiny_models, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    result = run_module("onnxquant.cli.validate", "--model_name_or_path", str(tiny_models.onnx("tiny-llama-96")),
                        "--dataset_path", str(short), "--block_size", "2048")
    assert_user_error(result, "fewer than one block of 2048")
