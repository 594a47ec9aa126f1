"""Model files: round trip, and every way a file can be wrong gives one clear ModelFileError."""
import h5py
import numpy as np
import pytest

from eqkernels import store
from eqkernels.errors import ModelFileError


def test_round_trip_and_metadata(tmp_path):
    arrays = {"a": np.arange(6.0).reshape(2, 3), "names": np.array([b"x", b"y"])}
    store.save(tmp_path / "m.h5", "histology-model", {"k": 1}, arrays)
    meta, back = store.load(tmp_path / "m.h5", "histology-model")
    assert meta["k"] == 1 and "jax" in meta["versions"]
    assert np.array_equal(back["a"], arrays["a"]) and back["names"].tolist() == [b"x", b"y"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_failures_are_one_line(tmp_path):
    path = tmp_path / "m.h5"
    store.save(path, "histology-model", {"k": 1}, {"a": np.ones(3)})
    cases = {}
    with pytest.raises(ModelFileError, match="no such file") as e:
        store.load(tmp_path / "missing.h5")
    cases["missing"] = e
    with pytest.raises(ModelFileError, match="expected 'molecule-model'") as e:
        store.load(path, "molecule-model")
    cases["kind"] = e
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ModelFileError, match="not a readable HDF5") as e:
        store.load(tmp_path / "text.h5")
    cases["text"] = e
    data = path.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a readable HDF5|checksum") as e:
        store.load(tmp_path / "cut.h5")
    cases["truncated"] = e
    tampered = tmp_path / "tampered.h5"
    tampered.write_bytes(data)
    with h5py.File(tampered, "r+") as f:
        f["a"][0] = 5.0
    with pytest.raises(ModelFileError, match="checksum") as e:
        store.load(tampered)
    cases["tampered"] = e
    newer = tmp_path / "newer.h5"
    newer.write_bytes(data)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = store.FORMAT_VERSION + 1
    with pytest.raises(ModelFileError, match="newer eqkernels") as e:
        store.load(newer)
    cases["newer"] = e
    for name, err in cases.items():
        message = str(err.value)
        assert "\n" not in message and ".h5" in message, name


def test_object_arrays_are_rejected(tmp_path):
    with pytest.raises(TypeError, match="object"):
        store.save(tmp_path / "m.h5", "x", {}, {"a": np.array([{"x": 1}], dtype=object)})


def test_kind_of_reads_the_kind_and_fails_in_one_line(tmp_path):
    store.save(tmp_path / "e.h5", "ensemble", {"k": 1}, {"a": np.ones(2)})
    assert store.kind_of(tmp_path / "e.h5") == "ensemble"
    with pytest.raises(ModelFileError, match="no such file"):
        store.kind_of(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ModelFileError, match="not a readable HDF5") as e:
        store.kind_of(tmp_path / "text.h5")
    assert "\n" not in str(e.value)


def test_every_kind_stores_one_version_key_and_old_keys_are_read(tmp_path):
    """One key, meta["version"], for every file kind: `save(version=)` writes it, an old key passed in
    ("schema" of ensembles and histology models, "model_version" of molecule models) is written as it, and
    files on disk that hold an old key read back with "version"; `check_version` refuses newer files."""
    store.save(tmp_path / "new.h5", "ensemble", {"k": 1}, {}, version=3)
    with h5py.File(tmp_path / "old.h5", "w"):
        pass
    for legacy in ("schema", "model_version"):
        store.save(tmp_path / f"{legacy}.h5", "molecule-model", {legacy: 2}, {})
        with h5py.File(tmp_path / f"{legacy}.h5") as f:
            raw = f.attrs["meta"]
        assert '"version": 2' in raw and legacy not in raw.replace('"versions"', "")
    meta, _ = store.load(tmp_path / "new.h5")
    assert meta["version"] == 3 and "schema" not in meta
    # A file as eqkernels 0.1 wrote it: the old key inside the checksummed metadata.
    legacy_meta = '{"schema": 1, "k": 2}'
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f.attrs.update({"format": store.FORMAT, "format_version": 1, "kind": "ensemble", "meta": legacy_meta,
                        "checksum": store._checksum("ensemble", legacy_meta, {})})
    meta, _ = store.load(tmp_path / "old.h5")
    assert meta == {"version": 1, "k": 2}
    store.check_version(meta, 1, tmp_path / "old.h5")
    with pytest.raises(ModelFileError, match="version 3 is newer"):
        store.check_version(store.load(tmp_path / "new.h5")[0], 2, tmp_path / "new.h5", label="ensemble")
