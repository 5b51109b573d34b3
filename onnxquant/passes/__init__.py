"""Graph passes, one per file, each an onnx_ir InPlacePass: model in, model out."""

from onnxquant.passes.emulate_microscaling import EmulateMicroscalingPass
from onnxquant.passes.fold_channel_scales import FoldChannelScalesPass
from onnxquant.passes.fuse_norm_ops import FuseNormOpsPass
from onnxquant.passes.fuse_rmsnorm import FoldNormIntoReadersPass
from onnxquant.passes.hadamard_groups import HadamardGroupsPass
from onnxquant.passes.quantize_graph import QuantizeGraphPass
from onnxquant.passes.quantize_kv_cache import QuantizeKVCachePass
from onnxquant.passes.rotate_r1 import RotateR1Pass
from onnxquant.passes.retie_embeddings import RetieEmbeddingsPass
from onnxquant.passes.untie_embeddings import UntieEmbeddingsPass

__all__ = ["EmulateMicroscalingPass", "FoldChannelScalesPass", "FoldNormIntoReadersPass", "FuseNormOpsPass", "HadamardGroupsPass", "QuantizeGraphPass", "QuantizeKVCachePass", "RetieEmbeddingsPass", "RotateR1Pass", "UntieEmbeddingsPass"]
