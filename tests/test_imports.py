"""Every module of the package imports on its own, in a fresh interpreter.

A circular import shows only when a module is the first of its cycle to be imported (`python -c "import
datatailor.train.rl"` failed while `import datatailor.stages.teams` worked), so each module is imported in a process
where no datatailor module was imported before. To keep this fast, one subprocess first learns (in a throw-away child
that imports everything) which third-party modules the package pulls in, imports those once, then forks a child per
module: the children share the libraries, never a datatailor module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env

PACKAGE = REPO / "src" / "datatailor"
SKIP = {"datatailor.__main__"}  # `python -m datatailor`: importing it runs the CLI

CHILD = r"""
import importlib, json, os, sys, traceback
modules = json.loads(sys.argv[1])


def ours(name):
    return name == "datatailor" or name.startswith("datatailor.")


def third_party():  # what importing every module pulls in besides the package, learnt in a child
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        for name in modules:
            try:
                importlib.import_module(name)
            except BaseException:
                pass
        with os.fdopen(write, "w") as fh:
            fh.write(json.dumps([m for m in sys.modules if not ours(m) and not m.startswith("__")]))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        text = fh.read()
    os.waitpid(pid, 0)
    return json.loads(text or "[]")


if hasattr(os, "fork"):
    for name in third_party():
        try:
            importlib.import_module(name)
        except BaseException:
            pass
    assert not [m for m in sys.modules if ours(m)], "a library imported the package"


def attempt(name):
    try:
        importlib.import_module(name)
        return {"status": "ok"}
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if isinstance(exc, ModuleNotFoundError) and missing and missing != "datatailor":
            return {"status": "missing_dependency", "detail": exc.name}
        return {"status": "failed", "detail": traceback.format_exc()}
    except BaseException:
        return {"status": "failed", "detail": traceback.format_exc()}


results = {}
if not hasattr(os, "fork"):  # no fork: a fresh interpreter per module
    import subprocess
    for name in modules:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
        results[name] = {"status": "ok"} if done.returncode == 0 else {"status": "failed", "detail": done.stderr}
else:  # a forked child per module, as many at a time as there are cores; each writes its result to a file
    import tempfile
    folder = tempfile.mkdtemp(prefix="imports-")
    running, pending = {}, list(enumerate(modules))
    while pending or running:
        while pending and len(running) < (os.cpu_count() or 1):
            index, name = pending.pop(0)
            path = os.path.join(folder, f"{index}.json")
            pid = os.fork()
            if pid == 0:
                with open(path, "w") as fh:
                    fh.write(json.dumps(attempt(name)))
                os._exit(0)
            running[pid] = (name, path)
        pid, _ = os.wait()
        name, path = running.pop(pid)
        text = open(path).read() if os.path.exists(path) else ""
        results[name] = json.loads(text) if text else {"status": "failed", "detail": "the child died without a result"}
print(json.dumps(results))
"""


def package_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name not in SKIP:
            names.append(name)
    return names


def import_each(modules: list[str]) -> dict[str, dict[str, str]]:
    env = cli_env(PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(modules)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
def test_every_module_imports_on_its_own() -> None:
    modules = package_modules()
    assert "datatailor.train.rl" in modules and "datatailor.stages.teams.stages" in modules and len(modules) > 50
    results = import_each(modules)
    failed = {name: r["detail"] for name, r in results.items() if r["status"] == "failed"}
    assert not failed, "modules that do not import on their own:\n" + "\n".join(f"--- {n}\n{d}" for n, d in failed.items())
    missing = {name: r["detail"] for name, r in results.items() if r["status"] == "missing_dependency"}
    if os.environ.get("CI"):  # CI installs every extra: a missing library there is a packaging fault
        assert not missing, missing


def test_the_check_sees_a_circular_import(tmp_path: Path) -> None:
    """The harness itself: a cycle among two fresh modules is reported as a failure, not as a missing library."""
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclepkg.b import B\nA = 1\n")
    (pkg / "b.py").write_text("from cyclepkg.a import A\nB = 2\n")
    env = cli_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / "src"), str(REPO)]))
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(["cyclepkg.a", "nonexistent_lib_xyz"])], env=env,
                          capture_output=True, text=True, timeout=60)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["cyclepkg.a"]["status"] == "failed" and "partially initialized" in results["cyclepkg.a"]["detail"]
    assert results["nonexistent_lib_xyz"]["status"] == "missing_dependency"
