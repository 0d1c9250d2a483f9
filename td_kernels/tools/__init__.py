"""The programs behind the ``td-kernels`` command (``cli``): ``demo``, ``info`` and the
benchmarks (``bench/``). Never imported by ``import td_kernels``; they use the library through
its public API like any user's script."""
