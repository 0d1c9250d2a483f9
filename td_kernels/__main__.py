"""``python -m td_kernels demo|bench|info``."""
import sys

from .tools.cli import main

sys.exit(main())
