"""A Qwen3-shaped decoder on jitkern ops, its PyTorch reference, and a driver comparing them.

    from jitkern_decoder import TINY, make_weights, JitkernDecoder, ReferenceDecoder, compare

(put ``examples/`` on ``sys.path``, or ``pip install -e examples/``).
"""
from .config import TINY, DecoderConfig, qwen3_8b_shapes
from .model import JitkernDecoder
from .reference import ReferenceDecoder
from .run import compare, rel_err
from .weights import make_weights

__all__ = ["TINY", "DecoderConfig", "qwen3_8b_shapes", "JitkernDecoder", "ReferenceDecoder",
           "compare", "rel_err", "make_weights"]
