"""One-off diagnostics, each runnable as `python -m benchmarks.tools.<name>` or by its path:
gpu_breakdown (device time against host time per call), tune_triton (Triton launch
configurations), host_overhead (Python time per call with the launches stubbed out),
module_memory (bytes one RSIRAttention keeps for backward), accuracy_saturated (backward
accuracy at a saturated softmax)."""
