"""How the fused decode step (fused_decode.cpp) is built and found: the one table that setup.py, which compiles
it when lmforge is installed, and lmforge.infer.fused, which imports the build that suits the CPU, both read.

Each ISA variant is its own module, named after everything its machine code depends on: the source, the flags and
the torch it was compiled against (`module_name`). So a stale build is never imported: after fused_decode.cpp or
torch changes, the name the runtime looks for is a new one, and the old file is simply not it (`make ext` builds
the new one and removes the old). Nothing here imports torch or lmforge: setup.py loads this file by its path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE = Path(__file__).with_name("fused_decode.cpp")
PREFIX = "_fused_decode_"

# -fopenmp: at::parallel_for only splits work when compiled with it (torch's own libgomp is reused).
# -fno-wrapv -g0: undo the -fwrapv -g that Python's own CFLAGS add to every extension (signed overflow is the
# compiler's to assume away in the kernels' index arithmetic, as in a plain c++ -O3 build; no debug info).
_AVX2 = ["-O3", "-fno-wrapv", "-g0", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
# variant -> compiler flags. AVX-512 machines get a build of their own whose multi-row tiles use its 32 vector
# registers.
VARIANTS: dict[str, list[str]] = {"avx2": _AVX2, "avx512": _AVX2 + ["-mavx512f", "-mavx512vl"]}
LINK_FLAGS = ["-fopenmp"]
# torch.backends.cpu.get_cpu_capability() -> the variants that run there, best first
CHOICES: dict[str, tuple[str, ...]] = {"AVX512": ("avx512", "avx2"), "AVX2": ("avx2",)}


def module_name(variant: str, torch_version: str) -> str:
    """`_fused_decode_<variant>_<12 hex digits>`: the digits hash the source, the flags and torch's version."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(repr((VARIANTS[variant], LINK_FLAGS, torch_version)).encode())
    return f"{PREFIX}{variant}_{digest.hexdigest()[:12]}"


def built_modules() -> list[Path]:
    """The compiled modules beside this file, current or stale."""
    return sorted(p for p in SOURCE.parent.glob(PREFIX + "*") if p.suffix in (".so", ".pyd"))
