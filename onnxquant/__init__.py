"""onnxquant: an ONNX graph-rewriting quantizer for LLMs run by ONNX Runtime GenAI."""

__version__ = "0.1.0"
