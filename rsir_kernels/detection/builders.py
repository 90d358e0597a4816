"""torchvision's maskrcnn_resnet50_fpn / fasterrcnn_resnet50_fpn with an RSIR backbone."""
from __future__ import annotations

from typing import Optional

from torchvision.models.detection import FasterRCNN, MaskRCNN

from .backbone import rsir_fpn_backbone
from .weights import Weights


COCO_CLASSES = 91  # torchvision's default: COCO's 90 category ids and the background


def _num_classes(num_classes: Optional[int], kwargs: dict) -> Optional[int]:
    """torchvision's rule: num_classes, or None when the caller brings its own box predictor."""
    if num_classes is None and "box_predictor" not in kwargs:
        return COCO_CLASSES
    return num_classes


def maskrcnn_rsir_fpn(model_name: str = "rsir_tiny", *, num_classes: Optional[int] = None,
                      weights_backbone: Optional[Weights] = None, trainable_stages: Optional[int] = None,
                      backbone_kwargs: Optional[dict] = None, **kwargs) -> MaskRCNN:
    """Mask R-CNN (the paper's section 4.3) on rsir_fpn_backbone(model_name, ...).

    num_classes counts the background; None: 91 (COCO, torchvision's default), or none when
    kwargs bring a box_predictor (and mask_predictor), as torchvision's MaskRCNN requires. weights_backbone: a
    classification checkpoint (rsir_fpn_backbone's `weights`). trainable_stages: 0..4, None =
    all. backbone_kwargs: rsir_fpn_backbone's other arguments and the RSIR model's
    (returned_stages, norm_layer, backend="cpp", drop_path_rate, ...). kwargs go to torchvision's
    MaskRCNN (min_size, max_size, size_divisible, box_detections_per_img, ...); any image
    size works (the backbone needs no multiple of 32).
    """
    backbone = rsir_fpn_backbone(model_name, weights=weights_backbone, trainable_stages=trainable_stages,
                                 **(backbone_kwargs or {}))
    return MaskRCNN(backbone, num_classes=_num_classes(num_classes, kwargs), **kwargs)


def fasterrcnn_rsir_fpn(model_name: str = "rsir_tiny", *, num_classes: Optional[int] = None,
                        weights_backbone: Optional[Weights] = None, trainable_stages: Optional[int] = None,
                        backbone_kwargs: Optional[dict] = None, **kwargs) -> FasterRCNN:
    """Faster R-CNN on rsir_fpn_backbone(model_name, ...); the arguments as maskrcnn_rsir_fpn's."""
    backbone = rsir_fpn_backbone(model_name, weights=weights_backbone, trainable_stages=trainable_stages,
                                 **(backbone_kwargs or {}))
    return FasterRCNN(backbone, num_classes=_num_classes(num_classes, kwargs), **kwargs)
