"""Compiles lmforge's fused decode step (lmforge/infer/fused_decode.cpp) when lmforge is installed.

Everything else about the package is declared in pyproject.toml. This file adds one extension module per ISA
variant that lmforge.infer.fused chooses between at import (lmforge/infer/fused_build.py: AVX2, AVX-512), built
with PyTorch's own extension build (torch.utils.cpp_extension), so that nothing compiles at run time: no wait on a
lock, no shared cache. An editable install (`pip install -e .`, which `make demo` and `make test` run) and
`make ext` (`python setup.py build_ext --inplace`) put the modules beside fused_decode.cpp in this checkout, so two
checkouts never share or disturb a build. A module whose name (a hash of the source, flags and torch) is already
there is kept, not rebuilt; the modules of older sources are removed once the new ones are in place, each file
replaced by an atomic rename, so a running lmforge never sees a half-written one.

Where a variant cannot be built (no C++ compiler, no torch at build time) the install still succeeds: the build
says why, and lmforge decodes with packed linear layers instead, saying so once.

torch must be importable here: install with `--no-build-isolation` into an environment that has torch (and
ninja, which makes the build faster), as the Makefile does.
"""

import filecmp
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("fused_build", ROOT / "lmforge" / "infer" / "fused_build.py")
fused_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fused_build)


def say(message: str) -> None:
    print(f"lmforge: {message}", file=sys.stderr, flush=True)


try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as e:  # e.g. an isolated build without torch: the package installs, decoding falls back
    say(
        f"the fused decode step is not built: torch is not importable at build time ({e}); install torch first "
        f"and pip install with --no-build-isolation, or run `make ext` later"
    )
    torch = None
    from setuptools.command.build_ext import build_ext as BuildExtension


class BuildFusedDecode(BuildExtension):
    """BuildExtension that keeps current in-place builds, gives each variant its own temporary folder (they
    compile the same source with different flags), says why a variant failed instead of failing the install,
    and replaces in-place files by atomic renames."""

    def run(self) -> None:
        self.into_source = bool(self.inplace or self.editable_mode)  # setuptools clears `inplace` while building
        super().run()
        if self.into_source:
            current = {self.get_ext_filename(ext.name.rsplit(".", 1)[-1]) for ext in self.extensions}
            for stale in fused_build.built_modules():
                if stale.name not in current:
                    stale.unlink()

    def build_extensions(self) -> None:
        try:
            super().build_extensions()
        except Exception as e:  # before any variant compiled: e.g. no compiler to ask for its version
            say(
                f"the fused decode step is not built ({type(e).__name__}: {e}); lmforge will decode with packed "
                f"linear layers. Install a C++ compiler and run `make ext` (or pip install lmforge again)"
            )

    def build_extension(self, ext) -> None:
        name = ext.name.rsplit(".", 1)[-1]
        in_source = ROOT / "lmforge" / "infer" / self.get_ext_filename(name)
        if self.into_source and in_source.exists():  # this exact build is already here
            self.copy_file(str(in_source), self.get_ext_fullpath(ext.name))
            return
        temp = self.build_temp
        self.build_temp = os.path.join(temp, name)
        try:
            super().build_extension(ext)
        except Exception as e:  # no compiler, a compiler without these ISA flags, missing headers
            say(
                f"{name} (the fused decode step) did not build ({type(e).__name__}: {e}); lmforge will use "
                f"another build or packed linear layers. Install a C++ compiler and run `make ext`"
            )
        finally:
            self.build_temp = temp

    def copy_file(self, src, dst, *args, **kwargs):
        """Copy into a temporary file beside dst, then rename it over dst: a process that has the old module
        loaded keeps its mapping, and no process ever loads a half-copied file."""
        if not os.path.exists(src) or os.path.exists(dst) and filecmp.cmp(src, dst, shallow=False):
            return dst, False
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", dir=os.path.dirname(dst) or ".")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                out.write(f.read())
            os.chmod(tmp, os.stat(src).st_mode & 0o777)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dst, True


source = os.path.relpath(fused_build.SOURCE, ROOT)
setup(
    ext_modules=[]
    if torch is None
    else [
        CppExtension(
            f"lmforge.infer.{fused_build.module_name(variant, torch.__version__)}",
            [source],
            extra_compile_args=flags,
            extra_link_args=fused_build.LINK_FLAGS,
            optional=True,
        )
        for variant, flags in fused_build.VARIANTS.items()
    ],
    cmdclass={"build_ext": BuildFusedDecode},
)
