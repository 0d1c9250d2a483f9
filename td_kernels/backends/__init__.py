"""The kernels: one module per backend, each registering the six launchers of
``td_kernels._registry`` when it imports (``triton/``: Triton kernels; ``native``: the C++/CUDA
extension ``td_kernels._C`` built from csrc/). The pure-PyTorch reference
(``td_kernels.reference``) is the backend every one of them must match bit for bit.
``td_kernels/__init__.py`` imports each inside try/except, so a missing one is reported, not fatal."""
