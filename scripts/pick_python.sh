#!/usr/bin/env bash
# Prints the python that make should use: the machine's python3 when it already has a CUDA
# torch and triton (a GPU machine, which has no network to build a venv), else .venv/bin/python.
if python3 -c "import torch, triton; assert torch.version.cuda" >/dev/null 2>&1; then
  echo python3
else
  echo .venv/bin/python
fi
