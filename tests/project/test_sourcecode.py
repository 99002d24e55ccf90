"""Checks on the source tree itself: lint, and the core's atomics discipline."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "src" / "batchcore"


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(__import__("sys").executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the [test] extra)")
    proc = subprocess.run([ruff, "check", "python", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_atomic_names_its_memory_order():
    # Outside atomics.h, C code goes through the bc_* wrappers, whose names say
    # the order; inside it, only the *_explicit forms are used.
    implicit = re.compile(r"\batomic_(load|store|exchange|fetch_[a-z]+|compare_exchange_(weak|strong))\s*\(")
    wrapper = re.compile(r"\bbc_(load|store|fetch_\w+|cas)\w*\s*\(")
    orders = ("relaxed", "acquire", "release", "acq_rel", "seq_cst")
    for path in sorted(CORE.glob("*.h")) + sorted(CORE.glob("*.pyx")):
        text = path.read_text()
        assert not implicit.search(text), \
            f"{path.name}: an atomic without an explicit memory order"
        for match in wrapper.finditer(text):
            name = match.group(0)
            assert any(order in name for order in orders), f"{path.name}: {name} hides its order"



def test_every_cimported_name_is_used():
    # Cython does not warn about unused cimports; leftovers hide which floor
    # of the core a module really depends on.
    cimport = re.compile(r"^from\s+\S+\s+cimport\s+(\([^)]*\)|[^\n]+)", re.M)
    for path in sorted(CORE.glob("*.pyx")) + sorted(CORE.glob("*.pxd")):
        text = path.read_text()
        for match in cimport.finditer(text):
            names = [n.strip().split(" as ")[-1] for n in match.group(1).strip("()").replace("\n", " ").split(",")]
            rest = text[:match.start()] + text[match.end():]
            for name in filter(None, names):
                assert re.search(rf"\b{re.escape(name)}\b", rest), f"{path.name}: {name} is cimported but unused"


# -- the core's floors -------------------------------------------------------------------------

# A name a part defines at module level (in its .pyx or its .pxd): a class, a function, an
# enum and its members, a struct, a module-level variable.
_DEFINITION = re.compile(
    r"^(?:(?:cdef|cpdef)\s+(?:public\s+|readonly\s+)?(?:class|enum|struct|union)\s+(\w+)"
    r"|(?:class|def)\s+(\w+)"
    r"|(?:cdef|cpdef)\s+(?:inline\s+)?[\w.]+(?:\s*\*+\s*|\s+)(\w+)\s*[(=]"
    r"|(?:cdef|cpdef)\s+[\w.]+(?:\s*\*+\s*|\s+)(\w+)\s*$"
    r"|([A-Za-z_]\w*)\s*(?::[^=\n]*)?=(?!=))", re.M)
_ENUM = re.compile(r"^(?:cdef|cpdef)\s+enum\s+\w+\s*:\n((?:[ \t]+.*\n|[ \t]*\n)+)", re.M)


def _include_order(path: Path) -> list[str]:
    return re.findall(r'^include\s+"(\w+)\.(?:pyx|pxd)"', path.read_text(), re.M)


def _code_tokens(text: str) -> set[str]:
    """The identifiers a Cython source uses, without comments, strings and attribute names."""
    import io
    import tokenize
    names, previous = set(), ""
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NAME and previous != ".":
            names.add(tok.string)
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            previous = tok.string
    return names


def _local_names(text: str) -> set[str]:
    """Names a part binds inside its functions (they may shadow a module-level name)."""
    names = set()
    for line in text.splitlines():
        if not line[:1].isspace():
            continue
        target = re.match(r"\s*(?:for\s+)?([\w\s,()]+?)\s*(?:=(?!=)|\bin\b)", line)
        if target:
            names |= set(re.findall(r"\w+", target.group(1)))
    return names


def _definitions(text: str) -> set[str]:
    names = {n for match in _DEFINITION.finditer(text) for n in match.groups() if n}
    for block in _ENUM.findall(text):
        names |= set(re.findall(r"^[ \t]+(\w+)", block, re.M))
    return names


def test_the_core_is_one_module_whose_parts_use_only_lower_floors():
    # src/batchcore/_batchcore.pyx includes the parts of the one extension module in floor
    # order; a part may use what the parts included before it define, never what a later
    # one does, and no two parts define the same module-level name (they share one namespace).
    parts = _include_order(CORE / "_batchcore.pyx")
    declared = _include_order(ROOT / "python" / "batched_fn" / "_batchcore.pxd")
    assert parts[:3] == ["_errors", "_request", "_aio"], parts
    assert sorted(parts) == sorted(p.stem for p in CORE.glob("_*.pyx") if p.stem != "_batchcore"), \
        "every .pyx of src/batchcore is included once by _batchcore.pyx"
    assert declared == [p for p in parts if (CORE / f"{p}.pxd").exists()], \
        "the .pxd are included in the order of their .pyx"
    texts = {p: (CORE / f"{p}.pyx").read_text() for p in parts}
    headers = {p: (CORE / f"{p}.pxd").read_text() if (CORE / f"{p}.pxd").exists() else "" for p in parts}
    owner: dict[str, str] = {}
    for part in parts:
        # A name imported (`import x as _x`) is not a definition the floors care about.
        for name in _definitions(headers[part] + texts[part]) - {"__doc__"}:
            assert owner.setdefault(name, part) == part, f"{name} is defined by both {owner[name]} and {part}"
    for i, part in enumerate(parts):
        later = {name for name, where in owner.items() if where in parts[i + 1:]}
        used = (_code_tokens(headers[part]) | _code_tokens(texts[part])) - _local_names(texts[part])
        assert not used & later, \
            f"{part} uses {sorted(used & later)}, defined by a part included after it: " + \
            ", ".join(f"{n} in {owner[n]}" for n in sorted(used & later))


def test_the_floor_check_sees_a_part_using_a_later_one():
    later = "cdef class Channel:\n    pass\nREASONS = ('full',)\ncdef enum DispatchReason:\n    R_FULL = 0\n"
    assert {"Channel", "REASONS", "DispatchReason", "R_FULL"} <= _definitions(later)
    assert "Channel" in _code_tokens("cdef f(Channel c):\n    return c  # Channel\n")
    assert "Channel" not in _code_tokens("x = 'Channel'\ny = self.Channel\n")
    assert _local_names("def f():\n    a, pending = 1, []\n    for x in y:\n        pass\n") == {"a", "pending", "x"}


def test_every_c_declaration_is_used():
    # A .pxd of a C header declares what the core calls; a declaration nothing uses is dead.
    sources = "\n".join(p.read_text() for p in CORE.glob("*.pyx"))
    for path in sorted(CORE.glob("*.pxd")):
        text = path.read_text()
        if 'cdef extern from "' not in text:
            continue
        # functions, variables and types, one level into the extern block (not struct fields)
        declared = re.findall(r"^ {4}(?:const\s+)?(?:ctypedef\s+)?(?:struct\s+)?\w+[\s*]+(\w+)\s*(?:\(|:?$)",
                              text, re.M)
        assert declared, path.name
        for name in declared:
            others = "\n".join(p.read_text() for p in CORE.glob("*.pxd") if p != path)
            assert re.search(rf"\b{name}\b", sources + others), f"{path.name}: {name} is declared but unused"
