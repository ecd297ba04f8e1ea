"""The hand-written CPU kernels of the GRC layer (``csrc/``), built on first use.

``torch.utils.cpp_extension`` compiles ``csrc/pair_conv.cpp`` (the positional conv, and the layer's output
with the lambda mix fused into it) and ``csrc/gated_update.cpp`` (the cache update) the first time a
float32 or float64 CPU tensor reaches the layer (about 11 s; the build is cached under ``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``, and reused by later processes). It needs a C++ compiler and
``ninja``, which ``torch.compile`` on CPU needs as well. The build is specialised to the CPU's vector
instructions as PyTorch detects them (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or the
portable default), and each capability gets its own build, so nodes of different CPUs sharing one home
directory do not load each other's. The kernels run on PyTorch's OpenMP threads (``torch.set_num_threads``).

Where the build fails (no compiler, no ninja) the layer warns once and keeps its pure-PyTorch path,
which computes the same values; ``CACHED_TRANSFORMERS_NATIVE=0`` selects that path without trying.
GPUs, bfloat16 and float16 always use the pure-PyTorch path (cuDNN's depthwise kernels; under
``torch.compile`` inductor fuses the mix and the update there itself).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("pair_conv.cpp", "gated_update.cpp")]
_FLAGS = {  # torch's own dispatch levels (ATen/native/DispatchStub): what the CPU is known to run, and the
    # macro that selects ATen's vector types for it (as inductor's C++ kernels do)
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}
_state: dict[str, object] = {}


def enabled() -> bool:
    """Whether the native kernels are allowed (``CACHED_TRANSFORMERS_NATIVE`` unset or not ``0``)."""
    return os.environ.get("CACHED_TRANSFORMERS_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def build_name() -> str:
    """The extension's name for this CPU: one build per vector capability."""
    return f"cached_transformers_cpu_{torch.backends.cpu.get_cpu_capability().lower()}"


def load() -> bool:
    """Build (first time) and load the kernels into ``torch.ops.cached_transformers_cpu``; False where that fails.

    Called by the layer on its first CPU call; the outcome is remembered for the process.
    """
    if "ok" in _state:
        return bool(_state["ok"])
    if not enabled():
        _state["ok"] = False
        return False
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level, path = cpp_logger.level, os.environ.get("PATH", "")
    cpp_logger.setLevel(logging.ERROR)  # its import logs that a CPU-only machine has no CUDA runtime
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # the pip package's ninja in a virtualenv that is not activated
            os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
        capability = torch.backends.cpu.get_cpu_capability()
        cpp_extension.load(build_name(), [str(p) for p in _SOURCES], extra_cflags=["-O3", "-fopenmp", *_FLAGS.get(capability, [])],
                           extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
        _state["ok"] = True
    except Exception as error:  # noqa: BLE001  (any build failure: fall back, say why once)
        _state["ok"] = False
        warnings.warn(
            f"cached_transformers: the native CPU kernels of the GRC layer could not be built "
            f"({type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}); the "
            f"layer uses its pure-PyTorch path, which gives the same values more slowly. Install a C++ "
            f"compiler and ninja (pip install ninja) for the faster path, or set CACHED_TRANSFORMERS_NATIVE=0 "
            f"to silence this.", RuntimeWarning, stacklevel=2)
    finally:
        cpp_logger.setLevel(level)
        os.environ["PATH"] = path
    return bool(_state["ok"])


@contextlib.contextmanager
def disabled():
    """Within this block the layer takes its pure-PyTorch path (for comparisons); the outcome of the build is kept."""
    saved = dict(_state)
    _state["ok"] = False
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)


@torch.compiler.assume_constant_result
def kernels_built() -> bool:
    """:func:`load` as a constant to ``torch.compile`` (the layer's choice of path adds no guard or graph break)."""
    return load()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the native kernels take these tensors (all on CPU, all float32 or all float64) and are built (now if needed)."""
    first = tensors[0]
    return (first.device.type == "cpu" and first.dtype in (torch.float32, torch.float64)
            and all(t.dtype == first.dtype for t in tensors) and kernels_built())
