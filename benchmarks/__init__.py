"""The benchmarks of rsir_kernels: bench_attn.py (the main job, `make bench`), bench_model.py,
the shared harness in common/, one-off diagnostics in tools/ and the committed results/.

Run from the repository root, with the repository on the path (the Makefile's .venv has it
through a .pth file; elsewhere PYTHONPATH=.):

    python benchmarks/bench_attn.py        # or: python -m benchmarks.bench_attn
    python benchmarks/bench_model.py
    python -m benchmarks.tools.gpu_breakdown
"""
