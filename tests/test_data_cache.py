"""Cache: decode once, memory-map later, key on sources and parameters, write atomically, self-repair, prune."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medtuning_peft.data.cache as cache_module
from medtuning_peft.data import (
    CaseCache,
    CaseFileMissingError,
    CaseFiles,
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


def keep_times(path: Path, before: os.stat_result) -> None:
    """Sets the file's access and modification times back, as ``cp -p`` and ``rsync -a`` do."""
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    while os.stat(path).st_ctime_ns == before.st_ctime_ns:  # a coarse clock: wait for its next tick
        time.sleep(0.01)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("replace", ["rewritten_in_place", "renamed_over"])  # cp -p; rsync -a
def test_label_replaced_with_the_same_size_and_mtime_is_decoded_again(tmp_path, replace):
    shape = (8, 8, 8)
    nib.save(nib.Nifti1Image(np.full(shape, 40.0, np.float32), np.eye(4)), tmp_path / "image.nii")
    label_path = tmp_path / "label.nii"  # uncompressed: the same shape always has the same size
    first, corrected = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    first[2:4, 2:4, 2:4] = 1
    corrected[2:6, 2:6, 2:6] = 1
    nib.save(nib.Nifti1Image(first, np.eye(4)), label_path)
    files = CaseFiles("c", (tmp_path / "image.nii",), label_path, ("CT",), (0, 1))
    cache = CaseCache(tmp_path / "cache")
    assert int(cache.load(files).label.sum()) == 8
    before = os.stat(label_path)
    if replace == "rewritten_in_place":
        nib.save(nib.Nifti1Image(corrected, np.eye(4)), label_path)
    else:
        nib.save(nib.Nifti1Image(corrected, np.eye(4)), tmp_path / "incoming.nii")
        os.replace(tmp_path / "incoming.nii", label_path)
    keep_times(label_path, before)
    after = os.stat(label_path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert int(cache.load(files).label.sum()) == 64  # not the stale 8


def test_entries_keyed_by_the_previous_cache_version_are_rebuilt_and_pruned(
    kits_dir, tmp_path, count_decodes
):
    cache = CaseCache(tmp_path / "cache")
    files = list_kits19_cases(kits_dir)[0]

    def path_size_mtime(path):  # how cache version 1 identified a source file
        info = os.stat(path)
        return {"path": str(Path(path).absolute()), "size": info.st_size, "mtime_ns": info.st_mtime_ns}

    with pytest.MonkeyPatch.context() as patch:  # an entry written by the release with cache version 1
        patch.setattr(cache_module, "CACHE_VERSION", 1)
        patch.setattr(cache_module, "_fingerprint", path_size_mtime)
        cache.load(files)
        old_entry = cache.entry_dir(files)
    decodes = len(count_decodes)
    cache.load(files)
    assert len(count_decodes) == decodes + 2 and cache.entry_dir(files) != old_entry
    result = cache.prune(stale=True)
    assert [(e.path, e.reason) for e in result.removed] == [
        (old_entry, f"cache version 1; this code reads version {cache_module.CACHE_VERSION}")
    ]
    assert [e.path for e in cache.entries()] == [cache.entry_dir(files)]
    cache.load(files)
    assert len(count_decodes) == decodes + 2


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
    # The case was decoded: a cache that cannot be written (full disk, quota, read-only shared folder) costs
    # its caching, not the load.
    with pytest.warns(
        UserWarning, match=r"cannot write cache entry .*disk full.*case_00000' is used from memory"
    ):
        in_memory = cache.load(files)
    assert list((tmp_path / "cache").iterdir()) == []
    direct = load_kits19_case(files)
    assert not isinstance(in_memory.image, np.memmap)
    np.testing.assert_array_equal(in_memory.image, direct.image)
    np.testing.assert_array_equal(in_memory.label, direct.label)
    monkeypatch.setattr(cache_module.np, "save", original_save)
    case = cache.load(files)
    assert case.label is not None and cache.entry_dir(files).is_dir() and isinstance(case.image, np.memmap)


# Run in a child process: the limit on open files belongs to the process. Each memory-mapped array keeps a
# descriptor open, so a labelled case holds two for as long as it is used.
_DESCRIPTOR_CHILD = """
import os, resource, sys, warnings
from medtuning_peft.data import CaseCache, list_kits19_cases
root, cache_dir, mode = sys.argv[1:4]
files = list_kits19_cases(root)
open_now = len(os.listdir("/proc/self/fd"))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
limit = open_now + 40  # room for 20 labelled cases, not for all of them
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit if mode == "hard" else hard))
with warnings.catch_warnings():
    warnings.simplefilter("error")  # a warning (a "corrupt" entry rebuilt) fails the child
    try:
        cases = CaseCache(cache_dir).load_many(files)
    except OSError as error:
        print("ERROR", error)
        sys.exit(0)
print("LOADED", len(cases), resource.getrlimit(resource.RLIMIT_NOFILE)[0] > limit)
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors through /proc")
def test_a_data_set_larger_than_the_open_file_limit_loads_and_keeps_its_entries(tmp_path):
    import subprocess
    import sys

    write_synthetic_kits19(tmp_path / "kits", num_cases=40, shape=(16, 16, 16))
    files = list_kits19_cases(tmp_path / "kits")
    CaseCache(tmp_path / "cache").load_many(files)  # every entry written
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    run = [sys.executable, "-c", _DESCRIPTOR_CHILD, str(tmp_path / "kits"), str(tmp_path / "cache")]
    # The soft limit is raised (up to the hard limit) as the cases are mapped: all 40 load.
    soft = subprocess.run([*run, "soft"], capture_output=True, text=True, timeout=300)
    assert soft.returncode == 0, soft.stderr
    assert soft.stdout.split() == ["LOADED", "40", "True"]
    # A hard limit too low: a clear error that says what to raise, and no valid entry taken for damaged.
    hard = subprocess.run([*run, "hard"], capture_output=True, text=True, timeout=300)
    assert hard.returncode == 0, hard.stderr
    assert hard.stdout.startswith("ERROR") and "Too many open files" in hard.stdout, hard.stdout
    assert "hard limit" in hard.stdout and "ulimit -Hn" in hard.stdout and "was kept" in hard.stdout
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == names
    assert all(entry.current for entry in CaseCache(tmp_path / "cache").entries(files))


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


# -----------------------------------------------------------------------------------------------------
# Listing and pruning
# -----------------------------------------------------------------------------------------------------


@pytest.fixture
def three_cases(tmp_path):
    write_synthetic_kits19(tmp_path / "kits3", num_cases=3, shape=(16, 16, 16))
    return list_kits19_cases(tmp_path / "kits3")


def touch_source(files):
    """Gives the case's image a new modification time, as when the file is replaced."""
    stat = os.stat(files.images[0])
    os.utime(files.images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def entry_names(cache):
    return sorted(e.path.name for e in cache.entries())


def test_entries_report_case_size_and_last_use(three_cases, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    cache.load_many(three_cases)
    entries = cache.entries()
    assert [e.case_id for e in entries] == ["case_00000", "case_00001", "case_00002"]
    for entry, files in zip(entries, three_cases):
        assert entry.path == cache.entry_dir(files) and entry.key == cache.key(files)
        assert entry.size_bytes == sum(p.stat().st_size for p in entry.path.iterdir())
        assert entry.current is True and entry.reason == ""
        assert abs(entry.last_used - entry.path.stat().st_mtime) < 1e-6


def test_stale_entries_are_pruned_and_current_ones_kept(three_cases, tmp_path, count_decodes):
    cache = CaseCache(tmp_path / "cache")
    windowed = CTPreprocessing(window=(-100.0, 300.0))
    cache.load_many(three_cases)
    cache.load_many(three_cases, windowed)  # another experiment's preprocessing
    replaced = [cache.entry_dir(three_cases[0]), cache.entry_dir(three_cases[0], windowed)]
    touch_source(three_cases[0])
    cache.load(three_cases[0])  # case 0 re-decoded: both its earlier entries are stale
    old_version = cache.entry_dir(three_cases[1], windowed)
    meta = json.loads((old_version / "meta.json").read_text())
    meta["cache_version"] = 0  # written by an older release
    (old_version / "meta.json").write_text(json.dumps(meta))
    assert len(cache.entries()) == 7
    current = {cache.entry_dir(f).name for f in three_cases}

    # Without the cases in use, only entries that can never load again are stale.
    result = cache.prune(stale=True)
    assert {e.path.name: e.reason for e in result.removed} == {
        replaced[0].name: "source files changed since it was written",
        replaced[1].name: "source files changed since it was written",
        old_version.name: f"cache version 0; this code reads version {cache_module.CACHE_VERSION}",
    }
    assert result.removed_bytes == sum(e.size_bytes for e in result.removed) > 0
    assert not any(p.exists() for p in [*replaced, old_version]) and len(entry_names(cache)) == 4

    # With them, the entries of another preprocessing are stale too.
    marked = {e.path.name: e.current for e in cache.entries(three_cases)}
    assert marked == {n: n in current for n in marked}
    result = cache.prune(stale=True, cases=three_cases)
    assert [e.path for e in result.removed] == [cache.entry_dir(three_cases[2], windowed)]
    assert {e.path.name for e in result.kept} == current
    assert entry_names(cache) == sorted(current)
    decodes = len(count_decodes)
    cache.load_many(three_cases)
    assert len(count_decodes) == decodes  # the current entries still serve every case


def test_entry_with_a_missing_source_is_unknown_and_kept(three_cases, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    cache.load_many(three_cases)
    shutil.rmtree(three_cases[2].images[0].parent)  # e.g. the data drive is not mounted
    entry = next(e for e in cache.entries() if e.case_id == "case_00002")
    assert entry.current is None and "source file not found" in entry.reason
    assert cache.prune(stale=True).removed == [] and len(cache.entries()) == 3


def test_loads_update_last_use_and_the_size_budget_removes_least_recently_used(three_cases, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    cache.load_many(three_cases)  # cases 0, 1, 2
    before = {e.case_id: e.last_used for e in cache.entries()}
    cache.load(three_cases[0])  # now case 1 is the least recently used, then 2, then 0
    after = {e.case_id: e.last_used for e in cache.entries()}
    assert after["case_00000"] > before["case_00000"] and after["case_00001"] == before["case_00001"]
    assert [e.case_id for e in cache.entries()] == ["case_00001", "case_00002", "case_00000"]
    sizes = {e.case_id: e.size_bytes for e in cache.entries()}

    budget = sizes["case_00002"] + sizes["case_00000"]
    result = cache.prune(max_bytes=budget)
    assert [e.case_id for e in result.removed] == ["case_00001"]
    assert result.kept_bytes <= budget and sum(e.size_bytes for e in cache.entries()) == result.kept_bytes

    result = cache.prune(max_bytes=sizes["case_00000"])
    assert [e.case_id for e in result.removed] == ["case_00002"]
    assert [e.case_id for e in cache.entries()] == ["case_00000"]


def test_entries_unused_for_longer_than_the_age_are_pruned(three_cases, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    cache.load_many(three_cases)
    month_ago = os.stat(cache.entry_dir(three_cases[1])).st_mtime - 30 * 86400
    os.utime(cache.entry_dir(three_cases[1]), (month_ago, month_ago))
    result = cache.prune(older_than_s=7 * 86400)
    assert [e.case_id for e in result.removed] == ["case_00001"]
    assert [e.case_id for e in cache.entries()] == ["case_00000", "case_00002"]


def test_dry_run_deletes_nothing(three_cases, tmp_path, count_decodes):
    cache = CaseCache(tmp_path / "cache")
    cache.load_many(three_cases)
    touch_source(three_cases[0])
    cache.load(three_cases[0])
    on_disk = sorted(p.name for p in (tmp_path / "cache").rglob("*"))
    result = cache.prune(stale=True, older_than_s=0, max_bytes=0, dry_run=True)
    assert result.dry_run and len(result.removed) == 4 and result.kept == []
    assert result.removed_bytes == sum(e.size_bytes for e in cache.entries())
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == on_disk
    decodes = len(count_decodes)
    cache.load_many(three_cases)
    assert len(count_decodes) == decodes


def test_prune_never_deletes_what_is_not_a_cache_entry(three_cases, tmp_path):
    cache_dir = tmp_path / "cache"
    cache = CaseCache(cache_dir)
    cache.load(three_cases[0])
    real = cache.entry_dir(three_cases[0])
    outside = tmp_path / "outside"
    outside.mkdir()
    cache.load(three_cases[2])
    moved = cache.entry_dir(three_cases[2])
    moved.rename(outside / moved.name)  # a complete entry outside the cache folder ...
    moved.symlink_to(outside / moved.name)  # ... linked in under its own name
    (cache_dir / "my_results").mkdir()
    (cache_dir / "my_results" / "table.csv").write_text("dice\n0.9\n")
    (cache_dir / "case_00008-0123456789abcdef0123").mkdir()  # entry-like name, no meta.json
    (cache_dir / "case_00008-0123456789abcdef0123" / "image.npy").write_bytes(b"user data")
    garbled = cache_dir / "case_00007-0123456789abcdef0123"
    garbled.mkdir()
    (garbled / "meta.json").write_text("{")
    renamed = cache_dir / "case_00006-0123456789abcdef0123"  # meta.json names another case and key
    shutil.copytree(real, renamed)
    linked = cache_dir / "case_00005-aaaaaaaaaaaaaaaaaaaa"  # a valid entry holding a link out
    cache.load(three_cases[1])
    cache.entry_dir(three_cases[1]).rename(linked)
    meta = json.loads((linked / "meta.json").read_text())
    meta["case"]["case_id"], meta["key"] = "case_00005", "a" * 64
    (linked / "meta.json").write_text(json.dumps(meta))
    (linked / "label.npy").unlink()
    (linked / "label.npy").symlink_to(outside / moved.name / "label.npy")
    writer = cache_dir / ".tmp-case_00002-0123456789abcdef0123-123-deadbeef"  # a writer at work
    writer.mkdir()
    (writer / "image.npy").write_bytes(b"partial")
    decoy = sorted(p.name for p in cache_dir.iterdir() if p != real)

    assert [e.path for e in cache.entries()] == [real]
    result = cache.prune(stale=True, older_than_s=0, max_bytes=0)
    assert [e.path for e in result.removed] == [real]
    assert sorted(p.name for p in cache_dir.iterdir()) == decoy
    assert sorted(p.name for p in (outside / moved.name).iterdir()) == ["image.npy", "label.npy", "meta.json"]
    assert (cache_dir / "my_results" / "table.csv").read_text() == "dice\n0.9\n"
    assert (writer / "image.npy").exists() and (linked / "label.npy").is_symlink()


def test_interrupted_prune_leaves_no_entry_that_looks_valid(three_cases, tmp_path, monkeypatch):
    cache = CaseCache(tmp_path / "cache")
    cache.load(three_cases[0])
    entry = cache.entry_dir(three_cases[0])
    original_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        (Path(path) / "label.npy").unlink()  # half-way through the deletion
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        cache.prune(max_bytes=0)
    monkeypatch.setattr(cache_module.shutil, "rmtree", original_rmtree)
    assert not entry.exists() and cache.entries() == []
    leftovers = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(cache_module.TEMPORARY_PREFIX)
    assert cache.load(three_cases[0]).label is not None  # rebuilt
    assert cache.remove_temporaries(older_than_s=0) == 1 and len(cache.entries()) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "nothing to prune by"),
        ({"older_than_s": -1.0}, "older_than_s=-1.0"),
        ({"max_bytes": -5}, "max_bytes=-5"),
        ({"stale": True, "preprocessing": CTPreprocessing()}, "without cases"),
    ],
)
def test_prune_refuses_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CaseCache(tmp_path / "cache").prune(**kwargs)


def test_entry_of_a_source_edited_while_it_was_decoded_is_listed_stale_and_pruned(
    three_cases, tmp_path, monkeypatch
):
    cache = CaseCache(tmp_path / "cache")
    decode = cache_module.load_case

    def decode_then_edit(files, preprocessing):
        case = decode(files, preprocessing)
        touch_source(files)  # the image is replaced while the case is being decoded
        return case

    monkeypatch.setattr(cache_module, "load_case", decode_then_edit)
    cache.load(three_cases[0])
    monkeypatch.setattr(cache_module, "load_case", decode)
    folders = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1
    assert [(e.path, e.current) for e in cache.entries()] == [(folders[0], False)]  # not an unlisted orphan
    cache.prune(stale=True)
    assert not folders[0].exists()


@pytest.mark.parametrize(
    ("limits", "open_now", "cap", "expected"),
    [
        ((300, 20000), None, None, 600),  # descriptors not countable (none left to list them): still raised
        ((8192, None), 8000, 10240, 8258),  # macOS: 2 x soft is above OPEN_MAX, what is needed is taken
        ((1024, 1024), 900, None, None),  # the hard limit reached: nothing to raise (loading then says so)
    ],
)
def test_the_soft_limit_on_open_files_is_raised_as_far_as_the_system_allows(
    monkeypatch, limits, open_now, cap, expected
):
    resource = pytest.importorskip("resource")
    soft, hard = limits
    hard = resource.RLIM_INFINITY if hard is None else hard
    calls = []

    def setrlimit(which, values):
        if cap is not None and values[0] > cap:
            raise ValueError("current limit exceeds maximum limit")
        calls.append(values)

    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    monkeypatch.setattr(cache_module, "_open_descriptors", lambda: open_now)
    cache_module._reserve_descriptors(2)
    assert calls == ([] if expected is None else [(expected, hard)])
