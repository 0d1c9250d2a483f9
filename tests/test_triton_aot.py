"""Every Triton kernel variant compiled ahead of time for sm_80 and sm_90, without a GPU.

A lowering error (a layout Triton cannot convert, an op a target lacks) or a register spill
shows here in CI instead of on the first GPU run.  ``triton.compile`` with a ``GPUTarget``
runs the whole pipeline (TTIR, TTGIR, LLVM, PTX, ptxas) on the CPU; ptxas's ``-v`` report
(``TRITON_DUMP_PTXAS_LOG``) gives registers and spill bytes per kernel, and nvdisasm (shipped
with Triton) shows where local-memory traffic sits: never inside a loop.

The variants are the launchers' production configurations (tile sizes and warps from the
modules' knobs), pointers 16-byte aligned and F a multiple of 16 as the JIT specialises them
for the usual shapes.  Weight forward: for each target every combination of one-pass/streamed,
SELECT on/off, bits on/off and aligned/unaligned Philox rows (16), the dtype rotating so that
each dtype meets each setting.  N:M: the fast path at m = 2, 4, 16 and the general path at
m = 3, 9, 15, forward with and without bits and the recompute backward.  Both backwards, the
unit kernels (norms, the one-program selection, the row select) in every dtype.  The graph-safe
seed (``SEED_PTR``: the seed loaded from a device tensor): the weight forward and recompute
backward, the N:M forward and the unit selection once each per target; the sample-bracketed
selection (``SAMPLED``) in each dtype.  Runtime
branches (none of the above is one) compile with their kernel.

All compiles run once per session in ONE fresh process (this one may be running the
interpreter) with a private Triton cache, so they are really compiled (and ptxas really runs)
every time, two at a time.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
I64 = ("seed", "D", "origin", "row_stride")
SPILL_SLACK = 16  # bytes per thread, outside loops only (see test_compiles_without_spills)


def variants():
    """(name, module, kernel, types of the non-constexpr args, constexprs, num_warps)."""
    from td_kernels.backends.triton import _common as c, nm_dropout as nd, unit_dropout as ud, weight_dropout as wd

    def types(dt, bits_dt="i32", **extra):
        t = {"w_ptr": f"*{dt}", "out_ptr": f"*{dt}", "g_ptr": f"*{dt}", "x_ptr": f"*{dt}", "limit_ptr": "*i32",
             "bits_ptr": f"*{bits_dt}", "norm_ptr": "*fp32", "keep_ptr": "*u8", "seed_ptr": "*i64"}
        t.update({a: "i64" for a in I64})
        t.update(extra)
        return t

    out = []
    for cc in ARCHS:
        run = 0
        for one_pass in (True, False):
            for select in (True, False):
                for bits in (True, False):
                    for aligned in (True, False):
                        dt = DTYPES[(run + cc // 10) % 3]
                        run += 1
                        bg = wd.MAX_ONE_PASS_GROUPS if one_pass else wd.CHUNK_GROUPS
                        nw = wd.forward_warps(one_pass, bg)
                        name = (f"weight_fwd-{'onepass' if one_pass else 'streamed'}-select{int(select)}"
                                f"-bits{int(bits)}-aligned{int(aligned)}-{dt}-sm{cc}")
                        out.append((name, "weight_dropout", "_weight_dropout_kernel",
                                    types(dt, "i32" if bits else dt),
                                    dict(SELECT=select, ONE_PASS=one_pass, BITS=bits, ALIGNED=aligned, BLOCK_G=bg,
                                         SEED_PTR=False),
                                    nw))
        for i, dt in enumerate(DTYPES):
            bg = wd.BACKWARD_GROUPS
            out.append((f"weight_bwd_recompute-aligned{i % 2}-{dt}-sm{cc}", "weight_dropout",
                        "_weight_dropout_backward_kernel", types(dt), dict(ALIGNED=i % 2 == 1, BLOCK_G=bg, SEED_PTR=False),
                        c.num_warps(4 * bg)))
            rows = c.BITS_TILE // (32 * c.BITS_BLOCK_W)
            out.append((f"bits_bwd-{dt}-sm{cc}", "_common", "_bits_backward_kernel", types(dt),
                        dict(ROWS=rows, BLOCK_W=c.BITS_BLOCK_W), c.num_warps(c.BITS_TILE)))
            out.append((f"unit_norms-{dt}-sm{cc}", "unit_dropout", "_row_norms_kernel", types(dt),
                        dict(BLOCK=ud.NORM_BLOCK), c.num_warps(ud.NORM_BLOCK)))
            out.append((f"unit_rows_where-{dt}-sm{cc}", "unit_dropout", "_rows_where_kernel", types(dt),
                        dict(BLOCK=ud.ROWS_BLOCK), c.num_warps(ud.ROWS_BLOCK)))
        for select in (True, False):
            out.append((f"unit_keep-select{int(select)}-sm{cc}", "unit_dropout", "_unit_keep_kernel",
                        types("fp32"), dict(SELECT=select, BLOCK_G=ud.KEEP_GROUPS, SEED_PTR=False),
                        c.num_warps(4 * ud.KEEP_GROUPS)))
        # N:M: (n, m, backward, bits, aligned, dtype)
        for i, (n, m, backward, bits) in enumerate([(1, 2, False, True), (2, 4, False, True), (2, 4, True, False),
                                                    (8, 16, False, True), (8, 16, True, False), (3, 4, False, False),
                                                    (2, 3, False, True), (4, 9, True, False), (7, 15, False, False),
                                                    (14, 15, False, True)]):
            dt = DTYPES[(i + cc // 10) % 3]
            bg = nd.NM_GROUPS
            path = "fast" if m & (m - 1) == 0 else "general"
            kind = "bwd" if backward else f"fwd-bits{int(bits)}"
            out.append((f"nm_{path}-{n}of{m}-{kind}-aligned{i % 2}-{dt}-sm{cc}", "nm_dropout", "_nm_kernel",
                        types(dt, "i32" if bits else dt),
                        dict(N=n, M=m, BACKWARD=backward, BITS=bits, POW2=path == "fast", ALIGNED=i % 2 == 1,
                             BLOCK_G=bg, SEED_PTR=False), c.num_warps(4 * bg)))
        # the graph-safe seed (SEED_PTR: loaded from a device tensor): each kernel that draws once
        dt = DTYPES[cc // 10 % 3]
        bg = wd.MAX_ONE_PASS_GROUPS
        out.append((f"graphseed-weight_fwd-{dt}-sm{cc}", "weight_dropout", "_weight_dropout_kernel", types(dt),
                     dict(SELECT=True, ONE_PASS=True, BITS=True, ALIGNED=True, BLOCK_G=bg, SEED_PTR=True),
                     wd.forward_warps(True, bg)))
        out.append((f"graphseed-weight_bwd_recompute-{dt}-sm{cc}", "weight_dropout", "_weight_dropout_backward_kernel",
                    types(dt), dict(ALIGNED=True, BLOCK_G=wd.BACKWARD_GROUPS, SEED_PTR=True),
                    c.num_warps(4 * wd.BACKWARD_GROUPS)))
        out.append((f"graphseed-nm_fast-2of4-{dt}-sm{cc}", "nm_dropout", "_nm_kernel", types(dt),
                    dict(N=2, M=4, BACKWARD=False, BITS=True, POW2=True, ALIGNED=True, BLOCK_G=nd.NM_GROUPS,
                         SEED_PTR=True), c.num_warps(4 * nd.NM_GROUPS)))
        # the sample-bracketed selection (weight_dropout.SELECT = "sampled"): one-pass rows only
        for dt in DTYPES:
            bg = wd.MAX_ONE_PASS_GROUPS
            out.append((f"sampled-weight_fwd-{dt}-sm{cc}", "weight_dropout", "_weight_dropout_kernel", types(dt),
                        dict(SELECT=True, ONE_PASS=True, BITS=True, ALIGNED=True, BLOCK_G=bg, SEED_PTR=False,
                             SAMPLED=True), wd.forward_warps(True, bg)))
        out.append((f"graphseed-unit_keep-sm{cc}", "unit_dropout", "_unit_keep_kernel", types("fp32"),
                    dict(SELECT=True, BLOCK_G=ud.KEEP_GROUPS, SEED_PTR=True), c.num_warps(4 * ud.KEEP_GROUPS)))
    return out


def _compile(variant):
    """Compile one variant in this (non-interpreting) process; a JSON-able result."""
    import contextlib
    import importlib
    import io
    import re
    import time
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, module, kernel, types, consts, warps = variant
    fn = getattr(importlib.import_module(f"td_kernels.backends.triton.{module}"), kernel)
    sig = {a: "constexpr" if a in consts else (types[a] if a in types else "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a not in consts and (sig[a].startswith("*") or a == "F")}
    cc = int(name.rsplit("-sm", 1)[1])
    res = {"name": name}
    log = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                               options={"num_warps": warps})
    except Exception as e:  # noqa: BLE001 (reported by the test, with the message)
        res.update(ok=False, error=f"{type(e).__name__}: {e}"[-3000:])
        return res
    text = log.getvalue()
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.findall(r"Used (\d+) registers", text)
    ptx = k.asm["ptx"]
    res.update(ok=True, seconds=round(time.time() - t0, 2), registers=int(regs[-1]) if regs else None,
               spill_bytes=sum(int(a) + int(b) for a, b in spills) if spills else None,
               ptxas_report=bool(spills), local_in_loops=_local_memory_in_loops(k.asm["cubin"]),
               float_ops=sorted({ln.split()[0] for ln in ptx.splitlines()
                                 if "sqrt" in ln or "rcp" in ln or "cvt.rn.f32.f64" in ln}))
    return res


def _local_memory_in_loops(cubin: bytes):
    """SASS local-memory loads/stores (LDL/STL: spill traffic) that lie inside a loop, i.e.
    between a label and a later branch back to it (nvdisasm of Triton's own CUDA tools)."""
    import re
    import tempfile
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    labels, branches, local, addr = {}, [], [], -1
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = addr + 1  # the next instruction
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        if re.search(r"\b(LDL|STL)\b", m.group(2)):
            local.append(addr)
        b = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", m.group(2))
        if b:
            branches.append((addr, b.group(1)))
    loops = [(labels[t], a) for a, t in branches if t in labels and labels[t] <= a]
    return [hex(x) for x in local if any(lo <= x <= hi for lo, hi in loops)]


def main():
    from concurrent.futures import ProcessPoolExecutor
    todo = variants()
    with ProcessPoolExecutor(max_workers=int(os.environ.get("TD_AOT_WORKERS", "2"))) as pool:
        for res in pool.map(_compile, todo):
            print(json.dumps(res), flush=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every variant once, in a fresh process with a private cache."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DUMP_PTXAS_LOG="1",
               TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton_cache")))
    res = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200)
    if res.returncode != 0 and "ptxas" in res.stderr.lower() and "not found" in res.stderr.lower():
        pytest.skip("Triton's ptxas is missing")
    assert res.returncode == 0, res.stderr[-3000:]
    results = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["name"]] = r
    if os.environ.get("TD_AOT_REPORT"):  # registers and spills per variant, for the notes
        with open(os.environ["TD_AOT_REPORT"], "w") as f:
            json.dump(results, f, indent=1)
    return results


def _names():
    try:
        return [v[0] for v in variants()]
    except Exception:  # noqa: BLE001 (td_kernels.backends.triton did not import: the fixture says why)
        return ["import"]


@pytest.mark.parametrize("name", _names())
def test_compiles_without_spills(compiled, name):
    r = compiled[name]
    assert r["ok"], r["error"]
    assert r["ptxas_report"], "no ptxas -v report: TRITON_DUMP_PTXAS_LOG had no effect"
    # ptxas (CUDA 12.8, Triton 3.6) keeps a few kernels at 64 registers for occupancy and
    # parks a value or two in local memory outside the loops (a store before the radix loop, a
    # load after it): harmless.  Spills inside a loop, or more than a few registers' worth, fail.
    assert r["spill_bytes"] <= SPILL_SLACK, \
        f"{name}: {r['spill_bytes']} bytes of register spills ({r['registers']} registers)"
    assert not r["local_in_loops"], f"{name}: local-memory (spill) traffic inside loops at {r['local_in_loops']}"


def test_every_setting_is_compiled():
    """The matrix covers, on each target, every weight-forward flag combination and each dtype
    with each flag level, and every other kernel in every dtype."""
    names = _names()
    for cc in ARCHS:
        mine = [n for n in names if n.endswith(f"-sm{cc}")]
        fwd = [n for n in mine if n.startswith("weight_fwd")]
        assert len(set(n.rsplit("-", 2)[0] for n in fwd)) == 16
        for level in ("onepass", "streamed", "select0", "select1", "bits0", "bits1", "aligned0", "aligned1"):
            for dt in DTYPES:
                assert any(f"-{level}-" in n and f"-{dt}-" in n for n in fwd), (level, dt, cc)
        for prefix in ("weight_bwd_recompute", "bits_bwd", "unit_norms", "unit_rows_where", "nm_"):
            for dt in DTYPES:
                assert any(n.startswith(prefix) and f"-{dt}-" in n for n in mine), (prefix, dt, cc)
        for part in ("nm_fast", "nm_general", "-bwd-", "-fwd-bits0-", "-fwd-bits1-", "aligned0", "aligned1"):
            assert any(n.startswith("nm_") and part in n for n in mine), (part, cc)
        assert {"unit_keep-select0", "unit_keep-select1"} <= {n.rsplit("-", 1)[0] for n in mine}
        assert len([n for n in mine if n.startswith("graphseed-")]) == 4  # SEED_PTR: the graph-safe seed
        assert {n.split("-")[2] for n in mine if n.startswith("sampled-")} == set(DTYPES)


def test_norm_kernel_ptx_uses_ieee_float64_sqrt(compiled):
    """The norm's sqrt is PTX sqrt.rn.f64 (IEEE, as the interpreter's numpy and the
    reference), then one cvt.rn.f32.f64; never an approximate sqrt/rsqrt, which would break
    bit equality."""
    norms = [r for n, r in compiled.items() if n.startswith("unit_norms")]
    assert len(norms) == len(ARCHS) * len(DTYPES)
    for r in norms:
        assert r["ok"], r["error"]
        assert r["float_ops"] == ["cvt.rn.f32.f64", "sqrt.rn.f64"], r


if __name__ == "__main__":
    main()
