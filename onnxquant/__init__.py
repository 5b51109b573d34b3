"""onnxquant: an ONNX graph-rewriting quantizer for LLMs run by ONNX Runtime GenAI.

    import onnxquant
    onnxquant.export(None, "runs/smollm2-fp32")
    result = onnxquant.quantize("runs/smollm2-fp32", "runs/smollm2-w8a8", "w8a8")
    onnxquant.evaluate("runs/smollm2-w8a8", max_blocks=16).perplexity
"""

__version__ = "0.2.0.dev0"

from onnxquant.api import QuantizeResult, compare, evaluate, export, generate, quantize  # noqa: E402
from onnxquant.errors import UserError  # noqa: E402
from onnxquant.recipes import Recipe, RecipeError, builtin_recipes, load_recipe  # noqa: E402

__all__ = ["QuantizeResult", "Recipe", "RecipeError", "UserError", "__version__", "builtin_recipes", "compare", "evaluate",
           "export", "generate", "load_recipe", "quantize"]
