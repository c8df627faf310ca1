"""builtin:stdlib: each parsed module kept in the cache gives the same documents as parsing it."""

from __future__ import annotations

import itertools
import json

import pytest

from featurescribe.harvest import stdlib_corpus as sc

MODULE_A = '''"""Module A reads the things that the tests of this corpus give it, one after the other."""


def first(x):
    """The first function returns its argument as it was given, for the tests of this file."""
    return x
'''

MODULE_B = '''"""Module B writes the things that module A read, in the order that it read them in."""


class Writer:
    """A writer of things, which keeps each of them until the test that made it has ended."""

    def write(self, thing):
        return thing
'''


@pytest.fixture
def root(tmp_path):
    src = tmp_path / "lib"
    (src / "pkg").mkdir(parents=True)
    (src / "a.py").write_text(MODULE_A)
    (src / "pkg" / "b.py").write_text(MODULE_B)
    (src / "broken.py").write_text("def (:\n")
    return src


def docs(root, cache_in):
    return list(sc.stdlib_documents(root, cache_in=cache_in))


def counting_parser(monkeypatch) -> list:
    parsed = []
    real = sc.module_parts

    def parts(path):
        parsed.append(path.name)
        return real(path)

    monkeypatch.setattr(sc, "module_parts", parts)
    return parsed


def test_kept_modules_give_the_parsed_documents(root, tmp_path, monkeypatch):
    plain = docs(root, None)
    assert any("Module A reads" in d for d, _ in plain) and any("class Writer" in d for d, _ in plain)
    parsed = counting_parser(monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir()
    assert docs(root, cache) == plain
    assert sorted(parsed) == ["a.py", "b.py", "broken.py"]
    assert len(list(cache.glob("*.json"))) == 3 and not list(cache.glob(".part-*"))
    parsed.clear()
    assert docs(root, cache) == plain
    assert parsed == []  # every module came from the cache


def test_a_changed_module_is_parsed_again(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    docs(root, cache)
    (root / "a.py").write_text(MODULE_A.replace("Module A reads", "Module A now counts"))
    parsed = counting_parser(monkeypatch)
    got = docs(root, cache)
    assert parsed == ["a.py"]
    assert any("Module A now counts" in d for d, _ in got) and not any("Module A reads" in d for d, _ in got)
    assert got == docs(root, None)


def test_a_damaged_entry_is_parsed_again_and_replaced(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    plain = docs(root, cache)
    entries = sorted(cache.glob("*.json"))
    entries[0].write_text('{"path": "a.py", "size": 1')  # cut short, as by a full disk
    entries[1].write_text(json.dumps({"path": "elsewhere.py", "size": 0, "mtime_ns": 0, "prose": [], "code": []}))
    parsed = counting_parser(monkeypatch)
    assert docs(root, cache) == plain
    assert len(parsed) == 2
    parsed.clear()
    assert docs(root, cache) == plain and parsed == []


def test_a_cache_that_cannot_be_written_is_not_used(root, tmp_path, monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert docs(root, not_a_folder) == docs(root, None)
    monkeypatch.setenv("FEATURESCRIBE_CACHE", str(not_a_folder))
    assert sc.cache_folder(root) is None
    assert docs(root, True) == docs(root, None)


def test_the_installed_stdlib_reads_the_same_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATURESCRIBE_CACHE", str(tmp_path))
    plain = list(itertools.islice(sc.stdlib_documents(cache_in=None), 400))
    first = list(itertools.islice(sc.stdlib_documents(), 400))
    parsed = counting_parser(monkeypatch)
    again = list(itertools.islice(sc.stdlib_documents(), 400))
    assert plain == first == again
    assert parsed == []
    assert list((tmp_path / "corpus").glob("stdlib-py*-v*/*.json"))
