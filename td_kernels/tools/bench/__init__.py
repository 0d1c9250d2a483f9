"""Benchmarks: ``ops`` (one op on one weight, ``td-kernels bench``), ``step`` (whole training
steps, ``td-kernels bench --step``), ``inference`` (pruned and shrunk models); ``common`` holds
what they share."""
