"""What bench_attn.py, bench_model.py and the tools share: stage shapes and inputs (cases),
the rows and their check against rsir_kernels.reference (checks), timing (timing: eager times
and device times), measuring arithmetic (measure), run metadata (run_info), the command-line
basics (cli), progress lines (progress), and the printed tables, JSON and plot (report)."""
