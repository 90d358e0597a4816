"""RSIR-T and RSIR-B (Table 2 of the paper), and a small RSIR-micro for tests and demos.
`python -m rsir_kernels.models` prints their size. With timm (>= 1.0) installed they are also
timm models: `timm.create_model("rsir_tiny", ...)` after `import rsir_kernels` (timm_registry)."""
from .config import MODEL_NAMES, PAPER_FIGURES, RSIR_B, RSIR_MICRO, RSIR_T, VARIANTS, RSIRConfig
from .rsir import (ClassifierHead, PatchMerging, RSIRStage, RSIRTransformer, build, default_cfg, rsir_base,
                   rsir_micro, rsir_tiny)
from .checkpoint import from_checkpoint
from .timm_registry import register as register_timm

__all__ = ["RSIRConfig", "RSIR_T", "RSIR_B", "RSIR_MICRO", "VARIANTS", "MODEL_NAMES", "PAPER_FIGURES",
           "RSIRTransformer", "RSIRStage", "PatchMerging", "ClassifierHead", "default_cfg", "build", "rsir_tiny",
           "rsir_base", "rsir_micro", "register_timm", "from_checkpoint"]
