"""The package as shipped: one version source, ``python -m batched_fn --version``, and (under
``make testinstalled``) the installed wheel, the wheel file and the sdist themselves."""

from __future__ import annotations

import importlib.metadata
import os
import re
import struct
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import batched_fn
from batched_fn.__main__ import build_flavour, main, version_line

ROOT = Path(__file__).resolve().parents[2]
CORE_SOURCES = ROOT / "src" / "batchcore"
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
FLAVOURS = ("release", "debug", "asan", "tsan")
# Set by `make testinstalled` (and cibuildwheel's test run): the suite runs against a wheel
# installed in a fresh venv, from a directory outside the source tree.
INSTALLED = os.environ.get("BATCHED_FN_TEST_INSTALLED", "") not in ("", "0")
installed_only = pytest.mark.skipif(not INSTALLED, reason="checks the installed wheel: run `make testinstalled`")


# The one extension module of the core (src/batchcore/_batchcore.pyx includes the other .pyx).
CORE_MODULE = "_batchcore"


def _expected_line(flavour: str) -> str:
    python = f"CPython {sys.version_info.major}.{sys.version_info.minor}"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        python += "t"
    return f"batched_fn {batched_fn.__version__} ({flavour} build, {python}, {sysconfig.get_platform()})"


def _run_version(tmp_path: Path, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ if env is None else env)
    # it runs from tmp_path: a relative PYTHONPATH (make test-debug's ../build/debug) made absolute
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)
    proc = subprocess.run([sys.executable, "-m", "batched_fn", "--version"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


# -- one version source ----------------------------------------------------------------------

def test_the_version_is_written_only_in_the_package():
    tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "batched_fn.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*(\.dev\d+)?", batched_fn.__version__)


def test_the_installed_metadata_carries_the_package_version():
    try:
        version = importlib.metadata.version("batched_fn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("batched_fn is imported from the tree without being installed (no metadata)")
    assert version == batched_fn.__version__


# -- python -m batched_fn --------------------------------------------------------------------

def test_version_prints_version_flavour_python_and_platform(tmp_path):
    from batched_fn import _batchcore
    assert _batchcore.BUILD_FLAVOUR in FLAVOURS
    assert _run_version(tmp_path) == _expected_line(_batchcore.BUILD_FLAVOUR)
    assert version_line() == _expected_line(_batchcore.BUILD_FLAVOUR)
    if INSTALLED:
        assert _batchcore.BUILD_FLAVOUR == "release"   # what `make wheel` and cibuildwheel ship


def test_a_debug_build_says_debug(tmp_path):
    # `make test-debug` builds the package with BATCHCORE_DEBUG=1 into build/debug.
    debug = ROOT / "build" / "debug"
    if not (debug / "batched_fn" / "__main__.py").exists() or \
            not (debug / "batched_fn" / f"_batchcore{EXT_SUFFIX}").exists():
        pytest.skip("no debug build for this interpreter in build/debug (`make test-debug` makes one)")
    env = {**os.environ, "PYTHONPATH": str(debug)}
    assert _run_version(tmp_path, env) == _expected_line("debug")


def test_without_arguments_it_prints_usage(capsys):
    assert main([]) == 0
    assert "usage: python -m batched_fn" in capsys.readouterr().out


def test_an_unknown_argument_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--versio-n"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --versio-n" in capsys.readouterr().err


def _fake_package(root: Path, name: str, modules: dict[str, str]) -> Path:
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module, text in modules.items():
        (package / f"{module}.py").write_text(text)
    return package


def test_the_flavour_comes_from_batchcore_and_is_unknown_without_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _fake_package(tmp_path, "bf_core", {"_batchcore": "BUILD_FLAVOUR = 'asan'\n"})
    assert build_flavour("bf_core") == "asan"
    _fake_package(tmp_path, "bf_none", {"_alpha": "BUILD_FLAVOUR = 'tsan'\n", "public": "BUILD_FLAVOUR = 'debug'\n"})
    assert build_flavour("bf_none") == "unknown"


# -- the installed wheel ---------------------------------------------------------------------

def _elf_sections(path: Path) -> list[str]:
    """Section names of a 64-bit ELF file (enough to tell whether it was stripped)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    if data[4] != 2:
        pytest.skip(f"{path.name} is a 32-bit ELF file; this reader handles 64-bit ones")
    order = "<" if data[5] == 1 else ">"
    (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, = struct.unpack_from(order + "I", data, shoff + i * shentsize)
        offset, size = struct.unpack_from(order + "QQ", data, shoff + i * shentsize + 0x18)
        return name, offset, size

    _, str_offset, str_size = header(shstrndx)
    names = data[str_offset:str_offset + str_size]
    return [names[n:names.index(b"\0", n)].decode() for n, _, _ in map(header, range(shnum))]


@installed_only
def test_the_package_is_imported_from_the_installed_wheel_not_the_tree():
    package = Path(batched_fn.__file__).resolve().parent
    assert not package.is_relative_to(ROOT / "python"), package
    site = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    assert package.parent in site, (package, site)


@installed_only
def test_the_installed_package_has_its_stub_and_one_stripped_core_module():
    package = Path(batched_fn.__file__).resolve().parent
    for name in ("py.typed", "_batchcore.pyi", "__main__.py"):
        assert (package / name).is_file(), f"{name} is missing from the installed package"
    assert sorted(p.name for p in package.glob("*.so")) == [f"{CORE_MODULE}{EXT_SUFFIX}"]
    assert [p.name for p in package.glob("_*.pyi")] == [f"{CORE_MODULE}.pyi"]   # one stub, one module
    sections = _elf_sections(package / f"{CORE_MODULE}{EXT_SUFFIX}")
    assert ".dynsym" in sections
    assert not [s for s in sections if s.startswith(".debug") or s == ".symtab"], sections


def _one(pattern: str) -> Path:
    found = sorted((ROOT / "dist").glob(pattern))
    if not found:
        pytest.skip(f"nothing matches dist/{pattern} (`make wheel` builds it)")
    assert len(found) == 1, found
    return found[0]


@installed_only
def test_the_wheel_has_a_manylinux_tag_and_the_core_module():
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheel = _one(f"batched_fn-{batched_fn.__version__}-{tag}-{tag}-*.whl")
    platforms = wheel.name[:-len(".whl")].split("-")[-1].split(".")
    assert all(re.fullmatch(r"(manylinux|musllinux)(2014|_\d+_\d+)_\w+", p) for p in platforms), platforms
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert [n for n in names if n.endswith(".so")] == [f"batched_fn/{CORE_MODULE}{EXT_SUFFIX}"]
    assert {"batched_fn/py.typed", "batched_fn/_batchcore.pyi", "batched_fn/__main__.py"} <= names
    assert not [n for n in names if n.endswith((".pyx", ".pxd", ".c", ".h"))]


@installed_only
def test_the_sdist_has_every_core_source_and_nothing_generated():
    sdist = _one(f"batched_fn-{batched_fn.__version__}.tar.gz")
    prefix = f"batched_fn-{batched_fn.__version__}/"
    with tarfile.open(sdist) as tf:
        names = {n[len(prefix):] for n in tf.getnames()}
    sources = {f"src/batchcore/{p.name}" for pattern in ("*.pyx", "*.pxd", "*.h")
               for p in CORE_SOURCES.glob(pattern)} | {"python/batched_fn/_batchcore.pxd"}
    assert sources and sources <= names, sorted(sources - names)
    assert {"setup.py", "pyproject.toml", "README.md", "python/batched_fn/py.typed"} <= names
    generated = [n for n in names if n.startswith("src/") and n.endswith((".c", ".html", ".so"))]
    assert not generated, generated
