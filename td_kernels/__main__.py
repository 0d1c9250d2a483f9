"""``python -m td_kernels demo|bench|info``."""
import sys

from .cli import main

sys.exit(main())
