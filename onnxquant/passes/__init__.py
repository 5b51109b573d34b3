"""Graph passes, one per file, each an onnx_ir InPlacePass: model in, model out."""

from onnxquant.passes.fuse_rmsnorm import FoldNormIntoReadersPass
from onnxquant.passes.insert_qdq import InsertQDQPass
from onnxquant.passes.rotate_r1 import RotateR1Pass
from onnxquant.passes.smooth_quant import SmoothQuantPass
from onnxquant.passes.untie_embeddings import UntieEmbeddingsPass

__all__ = ["FoldNormIntoReadersPass", "InsertQDQPass", "RotateR1Pass", "SmoothQuantPass", "UntieEmbeddingsPass"]
