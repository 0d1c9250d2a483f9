"""Build script: the td_kernels package plus its native extension td_kernels._C (csrc/).

    pip install --no-build-isolation -e .      # torch must be installed first

What gets built (never by probing for a GPU: a build machine may have none):
  * CUDAExtension (CPU + CUDA kernels, sm_80 and sm_90, plus sm_90 PTX) when torch is a CUDA
    build (torch.version.cuda) and nvcc is found (CUDA_HOME or PATH);
  * CppExtension (CPU kernels only) otherwise.
Environment:
  TD_KERNELS_BUILD_EXT=0     skip the extension: the pure-Python package (reference, Triton)
  TD_KERNELS_BUILD_EXT=1     the extension is required: a compile error fails the install
  (unset)                    try it; where the CUDA part fails (torch refusing the toolkit's
                             version or the host compiler, an nvcc error) the CPU kernels are
                             built alone; where those fail too, the install goes on without the
                             extension (td_kernels imports, backend "native" reports why not);
                             either way with a warning
  TD_KERNELS_BUILD_CUDA=0    build the CPU kernels only, even where CUDA could be built
  CUDA_HOME                  the CUDA toolkit; unset, the toolkit of the `nvcc` on PATH (asked
                             with `nvcc --dryrun`, which also sees through wrapper scripts)
  MAX_JOBS                   parallel compile jobs (torch's ninja build)
What was decided and why is written to td_kernels/_build.json (BUILD_RECORD below): `td-kernels
info` and backend "native" read it to say why the CUDA kernels are missing.
"""
import json
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_EXT = os.environ.get("TD_KERNELS_BUILD_EXT", "auto").strip().lower()
if BUILD_EXT not in ("0", "1", "auto", ""):
    sys.exit(f"TD_KERNELS_BUILD_EXT must be 0, 1 or unset, got {BUILD_EXT!r}")


CUDA_SMS = (80, 90)  # SASS for these architectures
CUDA_PTX = 90        # plus PTX of this one
BUILD_RECORD = os.path.join("td_kernels", "_build.json")


def _sms_macro(sms):
    """The architectures as one integer, three decimal digits each (80, 90 -> 80090): a -D value
    must hold no comma (nvcc splits -D values at commas) and no space or quote (the build's
    shell), and csrc/td_ops.cpp takes this one apart again for _C.BUILD_INFO."""
    assert all(10 <= sm < 1000 for sm in sms), sms
    return str(int("".join(f"{sm:03d}" for sm in sms)))


def write_build_record(record, build_lib=None):
    """td_kernels/_build.json: what this build made of the extension and why (see the module
    docstring), next to the sources (editable installs, in-place builds) and in build_lib (wheels)."""
    for root in (HERE, build_lib):
        if root and os.path.isdir(os.path.join(root, "td_kernels")):
            with open(os.path.join(root, BUILD_RECORD), "w") as f:
                json.dump(record, f, indent=1)
                f.write("\n")


def _cuda_home():
    """CUDA_HOME or CUDA_PATH if set, else the toolkit of the `nvcc` on PATH, else None.

    torch guesses the toolkit as the folder above `nvcc`'s, which is wrong when `nvcc` is a
    wrapper script (/usr/local/bin/nvcc -> /usr/local); `nvcc --dryrun` prints the real one as
    its TOP variable."""
    import re
    import shutil
    import subprocess

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        m = None
    return os.path.realpath(m.group(1).strip()) if m else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvcc_version(nvcc):
    """(major, minor) from `nvcc --version` ("... release 13.0, V13.0.48"); (0, 0) if unreadable."""
    import re
    import subprocess

    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"release (\d+)\.(\d+)", out)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    except (OSError, subprocess.SubprocessError):
        return (0, 0)


def _error_text(e):
    """One line for a build error: torch formats some messages lazily (``RuntimeError(msg, *args)``
    with %s in msg); newlines and runs of spaces are collapsed."""
    msg = str(e)
    if len(e.args) > 1 and isinstance(e.args[0], str) and "%s" in e.args[0]:
        try:
            msg = e.args[0] % e.args[1:]
        except TypeError:
            pass
    return f"{type(e).__name__}: {' '.join(msg.split())}"[:2000]


def _cpu_only(ext):
    """Turn the CUDAExtension into the CPU kernels' extension in place (the retry after a failed
    CUDA build): the CUDA sources, macros and libraries out."""
    ext.sources = [s for s in ext.sources if not s.startswith("csrc/cuda/")]
    ext.define_macros = [m for m in ext.define_macros if not m[0].startswith(("TD_WITH_CUDA", "TD_CUDA_", "TD_NVCC_"))]
    ext.libraries = [lib for lib in ext.libraries if lib not in ("cudart", "c10_cuda", "torch_cuda")]


def _extension_and_cmdclass():
    import torch

    cuda_home = _cuda_home() if torch.version.cuda is not None else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # torch reads it when cpp_extension is imported
    from torch.utils import cpp_extension as ce

    nvcc = os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else None
    if torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is a CPU-only build"
    elif nvcc is None or not os.path.exists(nvcc):
        why_no_cuda = (f"no nvcc at build time (CUDA_HOME={ce.CUDA_HOME or 'unset'}, none on PATH); "
                       f"torch {torch.__version__} wants CUDA {torch.version.cuda}")
    elif os.environ.get("TD_KERNELS_BUILD_CUDA", "1") == "0":
        why_no_cuda = "TD_KERNELS_BUILD_CUDA=0 at build time"
    else:
        why_no_cuda = None
    with_cuda = why_no_cuda is None
    record = {"extension": "building", "cuda": "building" if with_cuda else "not built",
              "why": why_no_cuda, "torch": torch.__version__, "cuda_home": ce.CUDA_HOME}
    sources = ["csrc/td_ops.cpp", "csrc/cpu/td_cpu.cpp"]
    # -O3 for the loops; -fno-trapping-math -fno-math-errno as torch's own CPU build, so that
    # loops with float conversions and sqrt vectorize; -fopenmp because at::parallel_for
    # (torch's OpenMP backend) is inlined into our code: without it every loop would run on
    # one thread. The OpenMP runtime is torch's libgomp.so.1, already loaded with torch.
    # (no -std: torch's BuildExtension adds the standard its headers need, C++20 for 2.13)
    cxx = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
    kwargs = dict(extra_link_args=["-fopenmp"], py_limited_api=True,
                  include_dirs=[os.path.join(HERE, "csrc")])
    if with_cuda:
        sources += ["csrc/cuda/td_cuda.cu", "csrc/cuda/td_cuda_binding.cpp"]
        # no --use_fast_math: its flush-to-zero would change the keys of float64 weights
        # whose float32 rounding is subnormal, and its approximate sqrt the unit norms
        nv = ["-O3", "-lineinfo"] + [f"-gencode=arch=compute_{sm},code=sm_{sm}" for sm in CUDA_SMS]
        nv.append(f"-gencode=arch=compute_{CUDA_PTX},code=compute_{CUDA_PTX}")  # PTX: newer GPUs JIT it
        major, minor = _nvcc_version(nvcc)
        # _C.BUILD_INFO is composed from these numbers in csrc/td_ops.cpp (macro values with
        # spaces or quotes would not survive the build's shell)
        record["nvcc"] = f"{nvcc} ({major}.{minor})"
        macros = [("TD_WITH_CUDA", None), ("TD_CUDA_SMS", _sms_macro(CUDA_SMS)),
                  ("TD_CUDA_PTX", str(CUDA_PTX)), ("TD_NVCC_MAJOR", str(major)), ("TD_NVCC_MINOR", str(minor))]
        ext = ce.CUDAExtension("td_kernels._C", sources, define_macros=macros,
                               extra_compile_args={"cxx": cxx, "nvcc": nv}, **kwargs)
    else:
        ext = ce.CppExtension("td_kernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)

    class BuildExt(ce.BuildExtension):
        """torch's BuildExtension: any failure is fatal with TD_KERNELS_BUILD_EXT=1; unset, a failed
        CUDA build is retried with the CPU kernels alone, and a failed CPU build installs without
        the extension (the module docstring). Each outcome goes to _build.json."""

        def build_extensions(self):
            # torch's build_extensions checks the CUDA toolkit (a version whose major differs from
            # torch's raises before any compile), then compiles; it also rebinds the compiler's
            # compile methods, which a second attempt must find as they were
            saved = (self.compiler.__dict__.get("compile"), self.compiler.__dict__.get("_compile"),
                     list(self.compiler.src_extensions))
            error = self._attempt()
            if error is not None and record["cuda"] == "building" and BUILD_EXT != "1":
                first = _error_text(error)
                self.warn(f"td_kernels: the CUDA kernels did not build ({first[:500]}); building the CPU "
                          "kernels alone. Set TD_KERNELS_BUILD_EXT=1 to make this an error.")
                record.update(cuda="failed", cuda_error=first,
                              why=f"the CUDA build failed ({first[:300]}); only the CPU kernels were built "
                                  "(reinstall with TD_KERNELS_BUILD_EXT=1 to see the whole error)")
                _cpu_only(ext)
                for name, value in zip(("compile", "_compile"), saved[:2]):
                    if value is None:
                        self.compiler.__dict__.pop(name, None)
                    else:
                        setattr(self.compiler, name, value)
                self.compiler.src_extensions = saved[2]
                error = self._attempt()
            if error is None:
                record.update(extension="built", cuda="built" if record["cuda"] == "building" else record["cuda"])
                write_build_record(record, self.build_lib)
                return
            record.update(extension="failed", error=_error_text(error))
            if record["cuda"] == "building":  # TD_KERNELS_BUILD_EXT=1
                record.update(cuda="failed", why="the build failed")
            write_build_record(record, self.build_lib)
            if BUILD_EXT == "1":
                raise error
            self.warn(f"td_kernels: building the native extension failed ({_error_text(error)[:500]}); "
                      "installing without it. Backend 'native' will be unavailable. Set "
                      "TD_KERNELS_BUILD_EXT=1 to make this an error.")
            # forget the extension, so that no later step (copying it next to the sources,
            # listing the wheel's files) looks for its library
            self.extensions = []

        def _attempt(self):
            try:
                super().build_extensions()
            except Exception as e:  # compiler missing, compile error, torch's toolkit checks, ...
                return e
            return None

    return [ext], {"build_ext": BuildExt.with_options(no_python_abi_suffix=False)}


if BUILD_EXT == "0":
    ext_modules, cmdclass = [], {}
    write_build_record({"extension": "not built", "cuda": "not built", "why": "TD_KERNELS_BUILD_EXT=0 at build time"})
else:
    ext_modules, cmdclass = _extension_and_cmdclass()

setup(
    name="td_kernels",
    packages=find_packages(include=["td_kernels", "td_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # the extension uses the stable Python ABI (no pybind11): one build serves every CPython
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
