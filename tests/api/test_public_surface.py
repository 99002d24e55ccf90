"""What a user imports: the names the README documents, and what ``import batched_fn`` loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import batched_fn
import batched_fn.errors

# Every name the README shows imported from the package or from batched_fn.errors.
PACKAGE_NAMES = ["batched_fn", "BatchedFn", "connect", "RemoteFn", "Failed", "Full", "Closed",
                 "BatchedFnError", "InternalError", "BatchInfo", "Stats"]
ERROR_NAMES = ["BatchedFnError", "Full", "Closed", "InternalError", "Failed", "RemoteError", "RemoteTraceback"]


@pytest.mark.parametrize("name", PACKAGE_NAMES)
def test_each_documented_name_is_importable_from_the_package_with_a_docstring(name):
    value = getattr(batched_fn, name)
    assert name in batched_fn.__all__ and name in dir(batched_fn)
    assert (value.__doc__ or "").strip(), f"batched_fn.{name} has no docstring"


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_each_error_is_importable_from_batched_fn_errors(name):
    value = getattr(batched_fn.errors, name)
    assert isinstance(value, type) and (issubclass(value, Exception) or value is batched_fn.Failed)
    assert name in batched_fn.errors.__all__ and name in dir(batched_fn.errors)
    assert (value.__doc__ or "").strip(), f"batched_fn.errors.{name} has no docstring"


def test_remote_errors_are_the_ones_cross_process_calls_raise():
    from batched_fn._shared import RemoteError, RemoteTraceback
    assert batched_fn.errors.RemoteError is RemoteError and issubclass(RemoteError, batched_fn.BatchedFnError)
    assert batched_fn.errors.RemoteTraceback is RemoteTraceback


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'batched_fn' has no attribute 'conect'"):
        batched_fn.conect
    with pytest.raises(AttributeError, match="module 'batched_fn.errors' has no attribute 'Remote'"):
        batched_fn.errors.Remote
    with pytest.raises(ImportError):
        exec("from batched_fn import conect")


# Run in a fresh interpreter: this one has long imported everything.
LAZY = textwrap.dedent("""
    import os, sys
    hooks = []
    real = os.register_at_fork
    def spy(**kwargs):
        if kwargs["after_in_child"].__module__.startswith("batched_fn"):
            hooks.append(kwargs["after_in_child"].__module__)
        real(**kwargs)
    os.register_at_fork = spy
    import batched_fn, batched_fn.errors
    f = batched_fn.batched_fn(lambda batch: batch, max_batch_size=4, max_delay=0.0)
    assert f(1) == 1
    f.close()
    loaded = sorted(m for m in sys.modules if m.startswith("batched_fn._shared"))
    print("after import:", loaded, hooks)
    assert not loaded, loaded
    assert hooks == ["batched_fn._api"], hooks
    batched_fn.errors.RemoteError
    assert "batched_fn._shared._client" in sys.modules
    assert "batched_fn._shared._client" in hooks, hooks
    print("ok")
""")


def test_import_batched_fn_loads_nothing_cross_process_until_it_is_used():
    proc = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
