"""The fused decode step is built when lmforge is installed (setup.py), never at run time: a run killed at any
moment cannot wedge the next one, two checkouts never share a build, and an install without a compiler still
works and says once that decoding falls back to packed linear layers.

Every run here is a real `python -m lmforge` process on a copy of the package or of the checkout, with its own
empty HOME, cache and TORCH_EXTENSIONS_DIR, so that anything written at run time would show.
"""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.checkpoint import save_model
from lmforge.config import ModelConfig
from lmforge.infer import fused_build
from lmforge.infer.fused import _load_extension
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer

PACKAGE = Path(lmforge.__file__).resolve().parent
CHECKOUT = PACKAGE.parent
CHECKOUT_FILES = ("setup.py", "pyproject.toml", "README.md")
CAPABILITY = torch.backends.cpu.get_cpu_capability()
FALLBACK = "decoding with packed linear layers instead"

needs_build = pytest.mark.skipif(
    CAPABILITY not in fused_build.CHOICES or _load_extension() is None,
    reason=f"the fused decode step is not built here (CPU capability {CAPABILITY}; "
    f"`make ext` builds it where a C++ compiler is present)",
)
needs_checkout = pytest.mark.skipif(
    not (CHECKOUT / "setup.py").exists(), reason="lmforge is installed from a wheel, not from a checkout"
)


def copy_package(dest: Path, built: bool = True) -> Path:
    """The lmforge package (with or without its built modules) under dest, as a fresh install would have it."""
    skip = ["__pycache__"] + ([] if built else [fused_build.PREFIX + "*"])
    shutil.copytree(PACKAGE, dest / "lmforge", ignore=shutil.ignore_patterns(*skip))
    return dest


def copy_checkout(dest: Path) -> Path:
    """A second checkout: the sources setup.py builds from, without this checkout's built modules."""
    copy_package(dest, built=False)
    for name in CHECKOUT_FILES:
        shutil.copy2(CHECKOUT / name, dest / name)
    return dest


def fresh_env(root: Path, pythonpath: Path) -> dict:
    """Environment of a user who has never run lmforge: empty home, cache and torch extension folders."""
    for name in ("home", "cache", "torch_extensions"):
        (root / name).mkdir(exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": str(pythonpath),
        "HOME": str(root / "home"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
    }


def written_at_run_time(root: Path) -> list[str]:
    return [
        str(p.relative_to(root)) for name in ("home", "cache", "torch_extensions") for p in (root / name).rglob("*")
    ]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A random 2-layer model with a byte-level BPE tokenizer (the fused step runs it)."""
    text = "the cat sat on the mat. the dog ran to the park and the bird sang in the tree. " * 20
    tok = train_tokenizer("bpe", [text], vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("gpt-nano", vocab_size=tok.vocab_size, n_layer=2, block_size=64))
    return str(save_model(tmp_path_factory.mktemp("install") / "model", model, tok))


def generate_command(model_folder: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lmforge",
        "generate",
        model_folder,
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "24",
        "--seed",
        "1",
        "--no-stream",
    ]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_build
def test_a_first_run_killed_at_random_moments_never_wedges_the_next(tmp_path, model_folder):
    """SIGKILL a fresh install's first `lmforge generate` at random moments (from interpreter start-up to the last
    token), five times; the run after each finishes promptly, through the fused step, writing no cache."""
    pythonpath = copy_package(tmp_path / "site")
    env = fresh_env(tmp_path, pythonpath)
    rng = random.Random(17)
    for attempt in range(5):
        moment = rng.uniform(0.0, 4.0)
        victim = subprocess.Popen(
            generate_command(model_folder), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(moment)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        t0 = time.monotonic()
        run = subprocess.run(
            generate_command(model_folder), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )  # a run waiting on a dead build's lock never returns: this catches it
        assert run.returncode == 0, (attempt, moment, run.stderr)
        assert run.stdout.strip(), f"no text after a kill at {moment:.2f} s"
        assert FALLBACK not in run.stderr, run.stderr  # the copy's own built module ran the decode
        print(f"killed at {moment:.2f} s; the next run took {time.monotonic() - t0:.1f} s")
    assert written_at_run_time(tmp_path) == []


@needs_build
def test_each_variant_built_for_this_cpu_computes_what_f_linear_computes():
    """Every ISA build the runtime may choose here (AVX-512 machines: also the AVX2 one) loads and multiplies."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 96), torch.randn(200, 96) / 96**0.5, torch.randn(200)
    for variant in fused_build.CHOICES[CAPABILITY]:
        name = fused_build.module_name(variant, torch.__version__)
        module = __import__(f"lmforge.infer.{name}", fromlist=["linear_act"])
        torch.testing.assert_close(
            module.linear_act(x, w, torch.Tensor(), b, 0), F.linear(x, w, b), atol=2e-5, rtol=1e-5
        )


@needs_build
def test_an_edited_source_is_never_run_through_its_stale_build(tmp_path, model_folder):
    """After fused_decode.cpp changes, the build of the old source is not loaded: decoding says to run `make ext`
    and falls back, in one line."""
    pythonpath = copy_package(tmp_path / "site")
    source = pythonpath / "lmforge" / "infer" / "fused_decode.cpp"
    source.write_text(source.read_text() + "\n// edited\n")
    run = subprocess.run(
        generate_command(model_folder),
        env=fresh_env(tmp_path, pythonpath),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    [line] = [line for line in run.stderr.splitlines() if FALLBACK in line]
    assert "make ext" in line and "another fused_decode.cpp" in line


@needs_checkout
def test_without_a_compiler_the_build_succeeds_and_decoding_says_once_that_it_falls_back(tmp_path, model_folder):
    checkout = copy_checkout(tmp_path / "checkout")
    env = fresh_env(tmp_path, checkout)
    build = subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
        cwd=checkout,
        env={**env, "CC": "/nonexistent/cc", "CXX": "/nonexistent/c++"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    assert "did not build" in build.stderr and "make ext" in build.stderr
    assert list((checkout / "lmforge" / "infer").glob(fused_build.PREFIX + "*")) == []
    run = subprocess.run(
        generate_command(model_folder), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    [line] = [line for line in run.stderr.splitlines() if FALLBACK in line]
    assert "not built when lmforge was installed" in line
    assert written_at_run_time(tmp_path) == []


@pytest.mark.slow
@needs_build
@needs_checkout
def test_a_second_checkout_builds_its_own_extension_and_leaves_the_first_alone(tmp_path):
    first = sorted(fused_build.built_modules())
    assert first, "this checkout's modules"
    before = {p: (p.stat().st_mtime_ns, sha256(p)) for p in first}
    second = copy_checkout(tmp_path / "second")
    env = fresh_env(tmp_path, second)
    build = subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
        cwd=second,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stderr
    built = sorted((second / "lmforge" / "infer").glob(fused_build.PREFIX + "*"))
    assert [p.name for p in built] == [p.name for p in first]  # same source and torch: the same builds
    assert {p: (p.stat().st_mtime_ns, sha256(p)) for p in first} == before  # the first checkout's, untouched
    assert written_at_run_time(tmp_path) == []

    probe = (
        "import torch, torch.nn.functional as F; from lmforge.infer.fused import _load_extension; "
        "e = _load_extension(); x, w = torch.randn(2, 64), torch.randn(32, 64); "
        "torch.testing.assert_close(e.linear_act(x, w, torch.Tensor(), torch.Tensor(), 0), F.linear(x, w), "
        "atol=2e-5, rtol=1e-5); print(e.__file__)"
    )
    for root in (CHECKOUT, second):  # each checkout imports its own build
        run = subprocess.run(
            [sys.executable, "-c", probe],
            env={**env, "PYTHONPATH": str(root)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert Path(run.stdout.strip()).resolve().parent == (root / "lmforge" / "infer").resolve()
