"""How many Triton kernel variants would a pytest selection compile on a GPU? Counted on a CPU.

On a GPU each distinct (kernel, constexpr values, argument types, integer specialisation) is one
JIT compile (a second or more each, which bench/gpu.sh's test stage pays). Here the selection
runs under Triton's interpreter, and every launch's key is recorded as the JIT would form it:
constexprs by value; tensors by dtype and 16-byte alignment; ints as i32/i64 and, unless the
kernel lists them in do_not_specialize, whether they equal 1 or divide by 16; launch options
(num_warps, ...). The distinct keys are printed at the end, per kernel and per test function
(how many it launches, and how many of those no other test launches: what leaving it out saves).

    python bench/count_triton_variants.py [pytest args]      # e.g. --gpu-tests tests/test_triton.py

It takes as long as the selection takes under the interpreter (test_triton.py: minutes).
"""
from __future__ import annotations

import collections
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton.jit kernels

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

VARIANTS: dict = collections.defaultdict(set)   # kernel name -> keys
TESTS: dict = collections.defaultdict(set)      # (kernel, key) -> test functions that launch it
_current = ["?"]


def _spec(value, specialise: bool):
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return type(value).__name__
    if isinstance(value, int):
        kind = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return (kind, value == 1, value % 16 == 0) if specialise else kind
    return type(value).__name__


def _key(fn: interpreter.InterpretedFunction, args, kwargs):
    names = fn.arg_names
    annotations = getattr(fn.fn, "__annotations__", {})
    no_spec = {names[i] if isinstance(i, int) else i for i in (fn.kwargs.get("do_not_specialize") or ())}
    bound = dict(zip(names, args))
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound.update({k: v for k, v in kwargs.items() if k in names})
    key = []
    for name in names:
        v = bound.get(name)
        is_constexpr = "constexpr" in str(annotations.get(name, ""))
        key.append((name, v if is_constexpr else _spec(v, name not in no_spec)))
    return tuple(key) + tuple(sorted(options.items()))


_run = interpreter.InterpretedFunction.run


def _counting_run(self, *args, grid, warmup, **kwargs):
    key = _key(self, args, kwargs)
    VARIANTS[self.fn.__name__].add(key)
    TESTS[(self.fn.__name__, key)].add(_current[0])
    return _run(self, *args, grid=grid, warmup=warmup, **kwargs)


class _Plugin:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        _current[0] = item.nodeid.split("[")[0]
        yield

    def pytest_terminal_summary(self, terminalreporter):
        w = terminalreporter.write_line
        total = sum(len(v) for v in VARIANTS.values())
        w(f"triton variants (distinct JIT keys): {total}")
        for name, keys in sorted(VARIANTS.items(), key=lambda kv: -len(kv[1])):
            w(f"  {name}: {len(keys)}")
        per_test = collections.Counter(t for tests in TESTS.values() for t in tests)
        only = collections.Counter(next(iter(tests)) for tests in TESTS.values() if len(tests) == 1)
        if os.environ.get("TD_VARIANTS_JSON"):  # every key with its tests, for other selections
            import json
            with open(os.environ["TD_VARIANTS_JSON"], "w") as f:
                json.dump([[k, repr(key), sorted(t)] for (k, key), t in TESTS.items()], f)
        for test, n in per_test.most_common():
            w(f"  {test}: launches {n}, {only[test]} of them launched by no other test")


if __name__ == "__main__":
    interpreter.InterpretedFunction.run = _counting_run
    sys.exit(pytest.main(sys.argv[1:] + ["-p", "no:cacheprovider"], plugins=[_Plugin()]))
