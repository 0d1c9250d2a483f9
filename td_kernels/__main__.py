"""``python -m td_kernels demo|bench``."""
import sys

from .cli import main

sys.exit(main())
