"""Graph passes, one per module, registered by kebab-case name.

Import a pass class from here (``qeff_graph.passes.KVRetention``) or create one by name
(``qeff_graph.passes.registry.create("kv-retention", kv_dtype="float16")``).
"""

from qeff_graph.passes import registry
from qeff_graph.passes.cleanup import Cleanup
from qeff_graph.passes.custom_rmsnorm import CustomRMSNorm
from qeff_graph.passes.fp16_clamp import FP16Clamp
from qeff_graph.passes.kv_retention import KVRetention
from qeff_graph.passes.last_token_logits import LastTokenLogits
from qeff_graph.passes.manager import PassManager
from qeff_graph.passes.matmul_int8 import MatMulInt8
from qeff_graph.passes.matmul_nbits import MatMulNBits
from qeff_graph.passes.ort_fuse_encoder import ORTFuseEncoder
from qeff_graph.passes.ort_group_query_attention import OrtGroupQueryAttention
from qeff_graph.passes.ort_skip_norm import OrtSkipNorm
from qeff_graph.passes.ort_valid_attention import OrtValidAttention
from qeff_graph.passes.past_shape import PastShape
from qeff_graph.passes.pipelines import PIPELINES, build_pipeline, pipeline_names
from qeff_graph.passes.pooling import Pooling
from qeff_graph.passes.position_mask import PositionMask

__all__ = [
    "PIPELINES",
    "Cleanup",
    "CustomRMSNorm",
    "FP16Clamp",
    "KVRetention",
    "LastTokenLogits",
    "MatMulInt8",
    "MatMulNBits",
    "ORTFuseEncoder",
    "OrtGroupQueryAttention",
    "OrtSkipNorm",
    "OrtValidAttention",
    "PassManager",
    "PastShape",
    "Pooling",
    "PositionMask",
    "build_pipeline",
    "pipeline_names",
    "registry",
]
