from importlib.metadata import EntryPoint

import pytest

from zsq_plugins import registry as registry_module
from zsq_plugins.errors import DuplicatePluginError, UnknownPluginError
from zsq_plugins.registry import Registry


def test_register_get_and_wildcards():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha_fmnist", 1)
    reg.register("beta_fmnist", 2)
    reg.register("gamma", 3)
    assert reg.get("beta_fmnist") == 2
    assert reg.names() == ["alpha_fmnist", "beta_fmnist", "gamma"]
    assert reg.names("*_fmnist") == ["alpha_fmnist", "beta_fmnist"]
    assert "gamma" in reg and "delta" not in reg


def test_unknown_name_lists_what_exists():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1)
    with pytest.raises(UnknownPluginError, match="unknown widget 'nope'; available: alpha"):
        reg.get("nope")


def test_duplicate_raises():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1)
    with pytest.raises(DuplicatePluginError, match="already registered"):
        reg.register("alpha", 2)
    with pytest.raises(ValueError):
        reg.register(" padded ", 3)


def _fake_entry_points(points):
    def entry_points(group):
        return [p for p in points if p.group == group]

    return entry_points


def test_entry_points_load_lazily_on_lookup(monkeypatch):
    point = EntryPoint(name="ext", value="json:dumps", group="test.group")
    monkeypatch.setattr(registry_module, "entry_points", _fake_entry_points([point]))
    reg: Registry[object] = Registry("widget", "test.group")
    reg.register("builtin", 1)
    assert reg.names() == ["builtin", "ext"]
    import json

    assert reg.get("ext") is json.dumps
    with pytest.raises(DuplicatePluginError):
        reg.register("ext", 2)


def test_conflicting_entry_points_raise(monkeypatch):
    points = [
        EntryPoint(name="ext", value="json:dumps", group="g"),
        EntryPoint(name="ext", value="json:loads", group="g"),
    ]
    monkeypatch.setattr(registry_module, "entry_points", _fake_entry_points(points))
    with pytest.raises(DuplicatePluginError, match="two installed packages"):
        Registry("widget", "g").names()


def test_broken_entry_point_fails_only_when_asked_for(monkeypatch):
    point = EntryPoint(name="broken", value="no_such_module_xyz:thing", group="g")
    monkeypatch.setattr(registry_module, "entry_points", _fake_entry_points([point]))
    reg: Registry[object] = Registry("widget", "g")
    reg.register("fine", 1)
    assert reg.get("fine") == 1
    with pytest.raises(ModuleNotFoundError):
        reg.get("broken")
