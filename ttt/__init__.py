"""ttt: Test-Time-Training (TTT) layers and language models in PyTorch, with Triton kernels.

    from ttt import TTTLinear, TTTMLP, TTTLM, get_config
"""
from .config import ModelConfig, get_config
from .layers.ttt import TTTLayer, TTTLayerState, TTTLinear, TTTMLP
from .model import TTTLM, BlockState, LMState
from .ops import TTTInputs, TTTState, make_tau, resolve_op, ttt_linear, ttt_mlp
from .ops.generic import ttt_generic

__version__ = "0.1.0"
__all__ = ["ModelConfig", "get_config", "TTTLayer", "TTTLayerState", "TTTLinear", "TTTMLP", "TTTLM", "BlockState", "LMState",
           "TTTInputs", "TTTState", "make_tau", "resolve_op", "ttt_linear", "ttt_mlp", "ttt_generic"]
