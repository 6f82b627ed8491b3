"""The documentation: every fenced ``python`` block of README.md, CONTRIBUTING.md and docs/*.md runs, and
docs/api.md names every public name.

Each block runs on its own (a fresh namespace, the working folder a temporary one), so each is a snippet a
reader can paste as it is. An HTML comment on the lines just above a block (invisible once rendered) can say:

* ``<!-- doc-test: requires transformers, lightning -->``: skipped, naming them, where those are not installed;
* ``<!-- doc-test: slow -->``: marked slow (``make test-quick`` leaves it out);
* ``<!-- doc-test: skip REASON -->``: not run, and the reason shows in the test report (a fragment that needs
  your own model or data, a GPU, several processes).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import textwrap

import pytest

import mas_kernels as mk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["README.md", "CONTRIBUTING.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*doc-test:\s*(\w+)\s*(.*?)\s*-->")


def _blocks():
    for rel in FILES:
        with open(os.path.join(ROOT, rel)) as f:
            text = f.read()
        for m in _FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            # The directives: the comment lines right above the fence.
            above = text[:m.start()].rstrip("\n").split("\n")
            directives = {}
            while above and above[-1].lstrip().startswith("<!--"):
                d = _DIRECTIVE.search(above.pop())
                if d:
                    directives[d.group(1)] = d.group(2)
            marks = [pytest.mark.slow] if "slow" in directives else []
            yield pytest.param(rel, line, m.group(1), directives, id=f"{rel}:{line}", marks=marks)


@pytest.mark.parametrize("path, line, code, directives", list(_blocks()))
def test_snippet_runs(path, line, code, directives, tmp_path, monkeypatch):
    unknown = set(directives) - {"requires", "slow", "skip"}
    assert not unknown, f"{path}:{line}: unknown doc-test directive(s) {sorted(unknown)}"
    if "skip" in directives:
        assert directives["skip"], f"{path}:{line}: a skipped block must say why"
        pytest.skip(directives["skip"])
    for module in filter(None, (m.strip() for m in directives.get("requires", "").split(","))):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    monkeypatch.chdir(tmp_path)
    with mk._backend.using(mk._backend.current()):  # a snippet may switch backends: restored after
        exec(compile(textwrap.dedent(code), f"{path}:{line}", "exec"), {"__name__": "__doc_snippet__"})


# ------------------------------------------------------------------ api.md
def _public_names() -> list[str]:
    """``mk.X`` for every name in ``mk.__all__``, ``MAS.X`` for the wrapper's public methods and properties,
    and each integration's public class."""
    names = [n for n in mk.__all__ if n != "__version__"]
    names += [f"MAS.{n}" for n, _ in inspect.getmembers(mk.MAS) if not n.startswith("_")]
    names += [f"ShardedPenalty.{n}" for n, _ in inspect.getmembers(mk.ShardedPenalty) if not n.startswith("_")]
    names += ["integrations.avalanche.MASPlugin", "integrations.transformers.MASCallback",
              "integrations.lightning.MASCallback"]
    return names


def test_api_md_names_every_public_name():
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        text = f.read()
    options = inspect.signature(mk.MAS).parameters
    missing = [n for n in _public_names() if f"`{n.split('.')[-1]}" not in text and f"`{n}" not in text]
    missing += [f"MAS({p}=)" for p in options if p != "model" and f"`{p}=" not in text]
    assert not missing, f"docs/api.md does not describe: {', '.join(missing)}"


def test_readme_stays_short_and_names_the_make_commands():
    with open(os.path.join(ROOT, "README.md"), "rb") as f:
        readme = f.read()
    assert len(readme) <= 12 * 1024, f"README.md is {len(readme)} bytes: move the reference into docs/"
    with open(os.path.join(ROOT, "Makefile")) as f:
        targets = set(re.findall(r"^([a-z-]+):", f.read(), re.M))
    named = set(re.findall(r"`make ([a-z-]+)`", readme.decode()))
    assert {"demo", "test", "test-quick", "check"} <= named and named <= targets, (named, targets)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "\nmake test\n" in f.read(), "CI must run the README's test command, make test"


def test_a_missing_avalanche_says_how_to_install_it_safely():
    # pip install 'mas_kernels[avalanche]' as it is pulls PyPI's CUDA torchvision beside a CPU torch.
    from mas_kernels.integrations import require

    with pytest.raises(ImportError, match=r"pip install 'mas_kernels\[avalanche\]' \(first install torchvision "
                                          r"from where your torch came from.*docs/install.md\)"):
        require("no_such_module_for_this_test", "avalanche", "MASPlugin")
