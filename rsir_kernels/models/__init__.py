"""RSIR-T and RSIR-B (Table 2 of the paper). `python -m rsir_kernels.models` prints their size."""
from .config import PAPER_FIGURES, RSIR_B, RSIR_T, RSIRConfig
from .rsir import PatchMerging, RSIRTransformer, rsir_base, rsir_tiny

__all__ = ["RSIRConfig", "RSIR_T", "RSIR_B", "PAPER_FIGURES", "RSIRTransformer", "PatchMerging",
           "rsir_tiny", "rsir_base"]
