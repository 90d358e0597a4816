"""RSIR backbones for torchvision's detection models (the paper's section 4.3: Mask R-CNN).

    from rsir_kernels.detection import maskrcnn_rsir_fpn, rsir_fpn_backbone
    model = maskrcnn_rsir_fpn("rsir_tiny", num_classes=91, weights_backbone="OUTPUT/last.pt")
    backbone = rsir_fpn_backbone("rsir_tiny")      # images (B, 3, H, W) -> OrderedDict of NCHW maps

Needs torchvision (its FeaturePyramidNetwork, MaskRCNN and FasterRCNN); any image size works
(rsir_kernels.models.rsir: stage maps of ceil(H / s) x ceil(W / s) cells).
"""
from .backbone import RSIRBackbone, RSIRBackboneWithFPN, rsir_fpn_backbone
from .builders import fasterrcnn_rsir_fpn, maskrcnn_rsir_fpn
from .weights import load_classification_weights

__all__ = ["RSIRBackbone", "RSIRBackboneWithFPN", "rsir_fpn_backbone", "maskrcnn_rsir_fpn",
           "fasterrcnn_rsir_fpn", "load_classification_weights"]
