"""python -m rsir_kernels.models: parameters and multiply-adds of RSIR-T/B beside the paper's.

Multiply-adds are torch.utils.flop_counter's FLOPs / 2 (it counts a multiply-add as two
FLOPs; the paper, like Swin and CSWin, reports multiply-adds as "FLOPs"). The window
attention op counts 2 * L * N * C multiply-adds per layer (q k^T and P v).
"""
import torch
from torch.utils.flop_counter import FlopCounterMode

from . import PAPER_FIGURES, build


def summary(name, resolution=224):
    model = build(name, num_classes=1000, backend="reference").eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, resolution, resolution))
    return params, counter.get_total_flops() / 2


def main():
    print(f"{'model':<10} {'params':>9} {'paper':>7} {'MACs @224':>10} {'paper':>7}")
    for name, (paper_params, paper_macs) in PAPER_FIGURES.items():  # the models the paper has figures of
        params, macs = summary(name)
        print(f"{name:<10} {params / 1e6:>8.2f}M {paper_params / 1e6:>6.0f}M {macs / 1e9:>9.2f}G "
              f"{paper_macs / 1e9:>6.1f}G")


if __name__ == "__main__":
    main()
