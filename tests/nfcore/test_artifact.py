"""Artifacts: safetensors only, atomic, hashed; every defect is an ArtifactError, never a crash."""

import json
import struct

import pytest
import torch

import nfcore
from nfcore import ArtifactError


@pytest.fixture
def flow():
    torch.manual_seed(0)
    return nfcore.build({"preset": "nsf", "dim": 2, "transforms": 2, "hidden": [8]})


@pytest.fixture
def blob(flow):
    return nfcore.saves(flow, metadata={"training": {"objective": "density"}})


def _rewrite_header(blob: bytes, edit) -> bytes:
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + blob[8 + n :]


def test_file_is_plain_safetensors_with_spec_and_hash(flow, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    nfcore.save(flow, path, metadata={"training": {"steps": 10}})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(flow.state_dict())
    assert json.loads(meta["nfcore.spec"]) == flow.spec
    assert meta["nfcore.content_hash"].startswith("sha256:")
    assert json.loads(meta["training"]) == {"steps": 10}
    assert nfcore.read_metadata(path)["nfcore.content_hash"] == meta["nfcore.content_hash"]


@pytest.mark.parametrize("cut", [0, 5, 8, 100, -1, -50])
def test_truncated_files_are_rejected(blob, cut):
    with pytest.raises(ArtifactError, match="(?i)truncated|corrupted"):
        nfcore.loads(blob[:cut])


def test_flipped_weight_byte_fails_the_hash(blob):
    data = bytearray(blob)
    data[-3] ^= 0xFF
    with pytest.raises(ArtifactError, match="content hash"):
        nfcore.loads(bytes(data))


def test_garbage_header_is_rejected(blob):
    data = bytearray(blob)
    data[10:20] = b"\xff" * 10
    with pytest.raises(ArtifactError):
        nfcore.loads(bytes(data))


def test_random_bytes_are_rejected():
    with pytest.raises(ArtifactError):
        nfcore.loads(torch.randint(0, 255, (4096,), dtype=torch.uint8).numpy().tobytes())


def test_pickle_is_never_loaded(tmp_path):
    import pickle

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ArtifactError):
        nfcore.load(path)


def test_mismatched_spec_is_rejected(blob):
    def edit(header):
        spec = json.loads(header["__metadata__"]["nfcore.spec"])
        spec["layers"][1]["hidden"] = [9]
        header["__metadata__"]["nfcore.spec"] = json.dumps(spec)

    with pytest.raises(ArtifactError):
        nfcore.loads(_rewrite_header(blob, edit))


def test_invalid_spec_is_rejected(blob):
    def edit(header):
        header["__metadata__"]["nfcore.spec"] = json.dumps({"dim": 2, "layers": [{"type": "x"}]})

    with pytest.raises(ArtifactError, match="invalid spec"):
        nfcore.loads(_rewrite_header(blob, edit))


def test_file_without_nfcore_metadata_is_rejected():
    from safetensors.torch import save

    with pytest.raises(ArtifactError, match="Not an nfcore model"):
        nfcore.loads(save({"w": torch.zeros(3)}))


def test_unknown_format_version_is_rejected(blob):
    def edit(header):
        header["__metadata__"]["nfcore.format_version"] = "99"

    with pytest.raises(ArtifactError, match="format version"):
        nfcore.loads(_rewrite_header(blob, edit))


def test_tampered_metadata_fails_the_hash(blob):
    def edit(header):
        header["__metadata__"]["training"] = '{"objective": "forged"}'

    with pytest.raises(ArtifactError, match="content hash"):
        nfcore.loads(_rewrite_header(blob, edit))


def test_missing_file_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="Cannot read"):
        nfcore.load(tmp_path / "nope.safetensors")


def test_save_replaces_atomically(flow, tmp_path):
    path = tmp_path / "model.safetensors"
    nfcore.save(flow, path)
    first = path.read_bytes()
    with torch.no_grad():
        next(flow.parameters()).add_(1.0)
    nfcore.save(flow, path)
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_reserved_metadata_keys_are_refused(flow):
    with pytest.raises(ValueError):
        nfcore.saves(flow, metadata={"nfcore.spec": "{}"})
