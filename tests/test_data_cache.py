"""Cache: decode once, memory-map later, key on sources and parameters, write atomically, self-repair."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

import medtuning_peft.data.cache as cache_module
from medtuning_peft.data import (
    CaseCache,
    CaseFileMissingError,
    CTPreprocessing,
    list_kits19_cases,
    load_cases,
    load_kits19_case,
    write_synthetic_kits19,
)


@pytest.fixture
def kits_dir(tmp_path):
    write_synthetic_kits19(tmp_path / "kits", num_cases=2, shape=(16, 32, 32), num_unlabelled=1)
    return tmp_path / "kits"


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    original = nib.load

    def spy(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(nib, "load", spy)
    return calls


def test_second_load_hits_the_cache_without_decoding(kits_dir, tmp_path, count_decodes):
    files = list_kits19_cases(kits_dir)
    first = CaseCache(tmp_path / "cache").load_many(files)
    assert len(count_decodes) == 3  # two images and one segmentation
    second = CaseCache(tmp_path / "cache").load_many(files)  # a fresh object, as in a new run
    assert len(count_decodes) == 3
    for a, b in zip(first, second):
        assert isinstance(b.image, np.memmap) and not b.image.flags.writeable
        np.testing.assert_array_equal(a.image, b.image)
        assert b.geometry.to_dict() == a.geometry.to_dict() and b.spacing == a.spacing
    assert second[1].label is None
    direct = load_kits19_case(files[0])
    np.testing.assert_array_equal(second[0].image, direct.image)
    np.testing.assert_array_equal(second[0].label, direct.label)
    np.testing.assert_array_equal(
        second[0].geometry.to_original(second[0].label), nib.load(files[0].label).get_fdata()
    )


def test_metadata_is_json_and_no_pickles_are_written(kits_dir, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    files = list_kits19_cases(kits_dir)[0]
    cache.load(files)
    entry = cache.entry_dir(files)
    assert sorted(p.name for p in entry.iterdir()) == ["image.npy", "label.npy", "meta.json"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["arrays"]["image"]["shape"] == [1, 16, 32, 32] and meta["preprocessing"]["kind"] == "ct"
    np.load(entry / "image.npy", allow_pickle=False)  # plain arrays, loadable without pickle


def test_key_changes_with_parameters_and_source_files(kits_dir, tmp_path, count_decodes):
    cache = CaseCache(tmp_path / "cache")
    files = list_kits19_cases(kits_dir)[0]
    default_key = cache.key(files)
    assert cache.key(files, CTPreprocessing()) == default_key
    assert cache.key(files, CTPreprocessing(window=(-100.0, 300.0))) != default_key
    assert cache.key(files, CTPreprocessing(target_spacing=(4.0, 4.0, 4.0))) != default_key
    cache.load(files)
    image = files.images[0]
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file was replaced
    assert cache.key(files) != default_key
    decodes = len(count_decodes)
    cache.load(files)
    assert len(count_decodes) == decodes + 2  # decoded again, not served stale


def test_failed_write_leaves_no_entry_and_no_temporary(kits_dir, tmp_path, monkeypatch):
    cache = CaseCache(tmp_path / "cache")
    files = list_kits19_cases(kits_dir)[0]
    original_save = np.save
    saved = []

    def failing_save(handle, array, *args, **kwargs):
        saved.append(array.shape)
        if len(saved) == 2:  # image.npy written, label.npy half-way
            handle.write(b"\x93NUMPY partial")
            raise OSError("disk full")
        return original_save(handle, array, *args, **kwargs)

    monkeypatch.setattr(cache_module.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        cache.load(files)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(cache_module.np, "save", original_save)
    case = cache.load(files)
    assert case.label is not None and cache.entry_dir(files).is_dir()


@pytest.mark.parametrize("damage", ["truncate_image", "delete_label", "garble_meta", "old_version"])
def test_corrupt_entry_is_detected_and_rebuilt(kits_dir, tmp_path, count_decodes, damage):
    cache = CaseCache(tmp_path / "cache")
    files = list_kits19_cases(kits_dir)[0]
    reference = np.array(cache.load(files).image)
    entry = cache.entry_dir(files)
    if damage == "truncate_image":
        data = (entry / "image.npy").read_bytes()
        (entry / "image.npy").write_bytes(data[: len(data) // 3])
    elif damage == "delete_label":
        (entry / "label.npy").unlink()
    elif damage == "garble_meta":
        (entry / "meta.json").write_text("{")
    else:
        meta = json.loads((entry / "meta.json").read_text())
        meta["cache_version"] = -1
        (entry / "meta.json").write_text(json.dumps(meta))
    decodes = len(count_decodes)
    with pytest.warns(UserWarning, match="rebuilding corrupt cache entry"):
        case = cache.load(files)
    assert len(count_decodes) == decodes + 2
    np.testing.assert_array_equal(case.image, reference)
    assert cache.load(files) is not None and len(count_decodes) == decodes + 2


def test_checksum_verification_catches_silent_corruption(kits_dir, tmp_path):
    cache = CaseCache(tmp_path / "cache", verify_checksums=True)
    files = list_kits19_cases(kits_dir)[0]
    reference = np.array(cache.load(files).image)
    path = cache.entry_dir(files) / "image.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="SHA-256"):
        np.testing.assert_array_equal(cache.load(files).image, reference)


def test_stale_temporaries_are_removed(tmp_path):
    cache = CaseCache(tmp_path / "cache")
    leftover = tmp_path / "cache" / ".tmp-case_00000-abc-123-deadbeef"
    leftover.mkdir()
    (leftover / "image.npy").write_bytes(b"partial")
    assert cache.remove_temporaries(older_than_s=3600) == 0
    assert cache.remove_temporaries(older_than_s=0) == 1 and not leftover.exists()


def test_missing_source_raises_the_case_error(kits_dir, tmp_path):
    files = list_kits19_cases(kits_dir)[0]
    files.images[0].unlink()
    with pytest.raises(CaseFileMissingError, match="case_00000"):
        load_cases([files], cache_dir=tmp_path / "cache")
