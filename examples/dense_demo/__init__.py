"""Dense-task demos on a synthetic shapes set: Mask R-CNN (detect.py) and UPerNet (segment.py)
with an rsir_micro backbone, under torchrun on CPUs. See docs/dense_tasks.md."""
