"""python -m rsir_kernels.train [--help]: see rsir_kernels/train/__init__.py."""
import sys

from . import main

sys.exit(main())
