"""`python -m onnxquant.cli`: the `onnxquant` command."""

from onnxquant.cli import entry_point

entry_point()
