"""The model store: layout, versions, concurrent publishing, listings reused within refresh_s,
safe names, and what it reads from a model's header."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import nfcore
from service.store import ModelNotFound, ModelStore, VersionExists

from .conftest import TINY, write_model


def test_store_lists_complete_integer_versions_only(tmp_path: Path) -> None:
    write_model(tmp_path, "a", version=1)
    write_model(tmp_path, "a", version=10)
    (tmp_path / "a" / "2").mkdir()  # a publish in progress: no file yet
    (tmp_path / "a" / "latest").mkdir()
    (tmp_path / "a" / "03").mkdir()
    (tmp_path / "empty").mkdir()
    store = ModelStore(tmp_path)
    assert store.names() == ["a"]
    assert store.versions("a") == [1, 10]
    assert store.latest("a") == 10
    assert store.resolve("a", None) == 10
    with pytest.raises(ModelNotFound, match="no version 2"):
        store.resolve("a", 2)
    with pytest.raises(ModelNotFound, match="Unknown model 'empty'"):
        store.latest("empty")


def test_store_publish_takes_next_version_and_roundtrips(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    flow = nfcore.build(TINY)
    assert store.publish("m", flow, {"training": {"steps": 1}}) == 1
    assert store.publish("m", flow) == 2
    loaded = nfcore.load(store.path("m", 2))
    x = torch.randn(5, 2)
    torch.testing.assert_close(loaded.log_prob(x), flow.log_prob(x))
    info = store.info("m", 1)
    assert info.metadata["training"] == {"steps": 1}  # JSON values decoded
    assert info.spec == flow.spec and info.content_hash.startswith("sha256:")
    with pytest.raises(VersionExists):
        store.publish("m", flow, version=2)


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    flow = nfcore.build(TINY)
    versions: list[int] = []
    barrier = threading.Barrier(8)

    def publish() -> None:
        barrier.wait()
        versions.append(ModelStore(tmp_path).publish("race", flow))

    threads = [threading.Thread(target=publish) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 9))
    assert store.versions("race") == list(range(1, 9))


def test_store_reuses_a_listing_within_refresh_s_but_finds_explicit_versions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service import store as store_module

    clock = [1000.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock[0])
    store = ModelStore(tmp_path, refresh_s=1.0)
    write_model(tmp_path, "m", version=1)
    assert store.latest("m") == 1
    write_model(tmp_path, "m", version=2)  # written by another process
    assert store.latest("m") == 1  # the listing is reused within refresh_s
    assert store.resolve("m", 2) == 2  # an explicit version is looked up afresh
    clock[0] += 1.5
    assert store.latest("m") == 2
    write_model(tmp_path, "m", version=3)
    clock[0] += 0.1
    assert store.latest("m") == 2
    assert store.publish("m", nfcore.build(TINY)) == 4  # a publish through the store is seen
    assert store.latest("m") == 4
    with pytest.raises(ModelNotFound, match=r"no version 7; its versions are \[1, 2, 3, 4\]"):
        store.resolve("m", 7)


def test_store_does_not_reuse_an_empty_listing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, refresh_s=100.0)
    (tmp_path / "m").mkdir()
    assert store.versions("m") == []
    write_model(tmp_path, "m", version=1)
    assert store.latest("m") == 1


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65])
def test_store_rejects_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="Expected a model name"):
        ModelStore(tmp_path).publish(name, nfcore.build(TINY))
