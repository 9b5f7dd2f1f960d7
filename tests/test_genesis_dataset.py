"""Tests of keras/genesis_dataset.py: the PyDataset of training pairs."""

import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest

import transforms as T
from genesis_dataset import GenesisPairDataset, release_pages

CONF = SimpleNamespace(save_samples=None)  # the original's rates by default


def ct_like(n, shape=(20, 20, 20), seed=0):
    rng = np.random.default_rng(seed)
    hu = np.round(np.cumsum(rng.normal(0, 40, (n,) + shape), axis=3)).clip(-1000, 1000)
    return ((hu + 1000) / 2000).astype(np.float32)


@pytest.fixture
def files(tmp_path):
    a = ct_like(7, seed=1)  # (N, R, C, D) float32
    b = ct_like(5, seed=2)[:, None].astype(np.float64)  # (N, 1, R, C, D) float64
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    return [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")], np.concatenate([a, b[:, 0]])


def flips_of(c):
    return [T.apply_flip(c, ax) for ax in ((), (0,), (1,), (0, 1))]


def test_shapes_len_and_attributes(files):
    paths, cubes = files
    ds = GenesisPairDataset(paths, 3, CONF, seed=1)
    assert ds.cube_shape == (20, 20, 20) and ds.num_cubes == 12 and len(ds) == 4
    x, y = ds[0]
    assert x.shape == y.shape == (3, 1, 20, 20, 20)
    assert x.dtype == y.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1
    assert len(GenesisPairDataset(paths, 3, CONF, steps=9)) == 9
    xl, yl = GenesisPairDataset(paths, 3, CONF, seed=1, data_format="channels_last")[0]
    assert xl.shape == (3, 20, 20, 20, 1)
    np.testing.assert_array_equal(xl[..., 0], x[:, 0])
    np.testing.assert_array_equal(yl[..., 0], y[:, 0])


def test_files_are_memory_mapped_not_loaded(files):
    paths, _ = files
    ds = GenesisPairDataset(paths, 3, CONF, seed=1)
    for path, a in zip(paths, ds._arrays, strict=True):
        assert isinstance(a, np.memmap), type(a)  # views of np.load(mmap_mode="r")
        assert not a.flags.writeable  # read-only: the cube files are never modified
        assert os.path.samefile(a.filename, path)
    ds[0]
    assert all(isinstance(a, np.memmap) for a in ds._arrays)
    # pickled for worker processes started with "spawn": the maps are reopened, not copied
    state = ds.__getstate__()
    assert state["_arrays"] is None
    clone = pickle.loads(pickle.dumps(ds))
    assert all(isinstance(a, np.memmap) for a in clone._arrays)
    np.testing.assert_array_equal(clone[1][0], ds[1][0])


def _rss_file_kb():
    with open("/proc/self/status") as f:
        return int([line.split()[1] for line in f if line.startswith("RssFile:")][0])


@pytest.mark.skipif(
    not os.path.exists("/proc/self/status"),
    reason="needs Linux /proc to read the process' mapped-file memory",
)
def test_reading_cubes_does_not_keep_them_resident(tmp_path):
    # 64 cubes of 32x32x32 float32 (8 MiB). Reading them all through a plain memory map leaves
    # every page mapped in this process (RssFile grows by the file's size); the dataset reads
    # each cube then unmaps its pages, so a whole epoch leaves next to nothing resident.
    n, shape = 64, (32, 32, 32)
    cubes = np.random.default_rng(0).random((n,) + shape, dtype=np.float32)
    path = str(tmp_path / "big.npy")
    np.save(path, cubes)
    mib = cubes.nbytes / 2**20

    plain = np.load(path, mmap_mode="r")
    before = _rss_file_kb()
    assert float(np.sum(plain, dtype=np.float64)) > 0  # touch every page
    grown_plain = (_rss_file_kb() - before) / 1024
    assert grown_plain > 0.8 * mib, "the control did not map the file: test cannot tell"

    ds = GenesisPairDataset(path, 8, CONF, seed=3)
    before = _rss_file_kb()
    seen = set()
    for i in range(len(ds)):
        ds[i]
        seen.update(ds.batch_indices(i).tolist())
    grown_ds = (_rss_file_kb() - before) / 1024
    assert len(seen) > n // 2  # the epoch really read most cubes
    assert grown_ds < 0.25 * mib, (grown_ds, grown_plain)


def test_release_pages_only_touches_read_only_maps(tmp_path):
    a = np.arange(4 * 4096, dtype=np.float32).reshape(4, 4096)
    assert release_pages(a[1]) is False  # anonymous memory: would be zeroed, so never
    np.testing.assert_array_equal(a[1], np.arange(4096, 8192))
    np.save(tmp_path / "c.npy", a)
    w = np.load(tmp_path / "c.npy", mmap_mode="r+")
    assert release_pages(w[1]) is False  # writable map: left alone
    r = np.load(tmp_path / "c.npy", mmap_mode="r")
    assert release_pages(r[1]) is True
    np.testing.assert_array_equal(r[1], a[1])  # the data are still there, read back from disk


def test_targets_are_distinct_cubes_of_both_files(files):
    paths, cubes = files
    ds = GenesisPairDataset(paths, 4, CONF, seed=2)
    used = set()
    for i in range(len(ds)):
        _, y = ds[i]
        ids = []
        for n in range(4):
            hits = [
                k
                for k in range(12)
                if any(np.allclose(y[n, 0], f, atol=0) for f in flips_of(cubes[k]))
            ]
            assert len(hits) == 1
            ids.append(hits[0])
        assert len(set(ids)) == 4
        np.testing.assert_array_equal(sorted(ids), sorted(ds.batch_indices(i)))
        used |= set(ids)
    assert any(k >= 7 for k in used) and any(k < 7 for k in used)


def test_batches_depend_only_on_seed_epoch_index(files):
    paths, _ = files
    a = GenesisPairDataset(paths, 3, CONF, seed=5)
    b = GenesisPairDataset(paths, 3, CONF, seed=5)
    # asked for in another order, and after other batches: same content
    b2 = b[2]
    b0 = b[0]
    np.testing.assert_array_equal(a[0][0], b0[0])
    np.testing.assert_array_equal(a[2][1], b2[1])
    assert not np.array_equal(a[0][0], a[1][0])
    c = GenesisPairDataset(paths, 3, CONF, seed=6)
    assert not np.array_equal(a[0][0], c[0][0])
    # epochs: on_epoch_end moves on; set_epoch goes back
    e0 = a[0]
    a.on_epoch_end()
    assert a.epoch == 1
    e1 = a[0]
    assert not np.array_equal(e0[0], e1[0])
    a.set_epoch(0)
    np.testing.assert_array_equal(a[0][0], e0[0])
    b.set_epoch(1)
    np.testing.assert_array_equal(b[0][0], e1[0])
    # the generator of batch i of epoch e is default_rng([seed, e, i])
    # (the files mix float32 and float64, so the transforms run in float64)
    rng = np.random.default_rng([5, 1, 0])
    all_cubes = np.concatenate([np.load(paths[0])[:, None], np.load(paths[1])])
    ref = T.make_batch(all_cubes.astype(np.float64), rng.choice(12, 3, replace=False), CONF, rng)
    np.testing.assert_array_equal(ref[0].astype(np.float32), e1[0])
    np.testing.assert_array_equal(ref[1].astype(np.float32), e1[1])


def test_identity_with_zero_rates(files):
    paths, cubes = files
    conf = SimpleNamespace(
        flip_rate=0.0, local_rate=0.0, nonlinear_rate=0.0, paint_rate=0.0, save_samples=None
    )
    ds = GenesisPairDataset(paths, 2, conf, seed=0)
    x, y = ds[1]
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(y[:, 0], cubes[ds.batch_indices(1)].astype(np.float32))


def test_epoch_set_only_through_set_epoch_when_not_from_keras(files):
    """epoch_from_keras=False: on_epoch_end is ignored, also after pickling (spawned workers)."""
    paths, _ = files
    ds = GenesisPairDataset(paths, 3, CONF, seed=5, epoch_from_keras=False)
    counting = GenesisPairDataset(paths, 3, CONF, seed=5)
    assert counting.epoch_from_keras is True and ds.epoch_from_keras is False
    ds.on_epoch_end()
    assert ds.epoch == 0
    ds.set_epoch(2)
    ds.on_epoch_end()
    assert ds.epoch == 2
    counting.set_epoch(2)
    np.testing.assert_array_equal(ds[1][0], counting[1][0])  # same batches as the default
    clone = pickle.loads(pickle.dumps(ds))
    assert type(clone) is GenesisPairDataset and clone.epoch_from_keras is False
    clone.on_epoch_end()
    assert clone.epoch == 2


def keras_epochs(ds, epochs):
    """Iterate like model.fit does (PyDatasetAdapter: enqueuer, on_epoch_begin/end)."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(ds, shuffle=False)
    out = []
    for _ in range(epochs):
        adapter.on_epoch_begin()
        out.append([b for b in adapter.get_numpy_iterator()])
        adapter.on_epoch_end()
    return out


# The process-pool variant runs on TensorFlow only: forking a process that has started JAX's
# threads can deadlock (JAX warns so), and the enqueuer under test is the same on every backend.
@pytest.mark.parametrize(
    "workers,mp",
    [
        pytest.param(2, False, marks=pytest.mark.multibackend),
        (2, True),
    ],
)
def test_keras_workers_see_epochs_and_match_direct_indexing(files, workers, mp):
    paths, _ = files
    direct = GenesisPairDataset(paths, 3, CONF, seed=9, steps=3)
    expect = []
    for e in range(2):
        direct.set_epoch(e)
        expect.append([direct[i] for i in range(3)])
    for w, m in ((1, False), (workers, mp)):
        got = keras_epochs(
            GenesisPairDataset(paths, 3, CONF, seed=9, steps=3, workers=w, use_multiprocessing=m), 2
        )
        for e in range(2):
            assert len(got[e]) == 3
            for (gx, gy), (ex, ey) in zip(got[e], expect[e], strict=True):
                np.testing.assert_array_equal(np.asarray(gx), ex)
                np.testing.assert_array_equal(np.asarray(gy), ey)
    assert not np.array_equal(expect[0][0][0], expect[1][0][0])


@pytest.mark.multibackend
def test_model_fit_on_dataset(files):
    import keras

    paths, _ = files
    ds = GenesisPairDataset(paths, 2, CONF, seed=0, steps=2)
    inp = keras.Input((1, 20, 20, 20))
    out = keras.layers.Conv3D(1, 1, data_format="channels_first")(inp)
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss="mse")
    hist = model.fit(ds, epochs=2, verbose=0)
    assert len(hist.history["loss"]) == 2
    # Keras calls on_epoch_end after each epoch, and once before the first one (its epoch
    # iterator's reset()): fit's epoch k reads dataset epoch k + 1.
    assert ds.epoch == 3
    # Resuming at initial_epoch=1 after set_epoch(1) lands on the same dataset epochs.
    resumed = GenesisPairDataset(paths, 2, CONF, seed=0, steps=2)
    resumed.set_epoch(1)
    model.fit(resumed, initial_epoch=1, epochs=2, verbose=0)
    assert resumed.epoch == ds.epoch


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: np.zeros((3, 20, 20), np.float32), r"\(N, R, C, D\)"),
        (lambda: np.zeros((3, 2, 20, 20, 20), np.float32), r"\(N, R, C, D\)"),
        (lambda: np.zeros((3, 20, 20, 20), np.int16), "float32 or float64"),
        (lambda: np.full((3, 20, 20, 20), 1.01, np.float32), r"bad\.npy \(cube 0\).*max=1\.01"),
        (lambda: np.full((3, 20, 20, 20), np.nan, np.float32), "NaN"),
        (lambda: np.zeros((1, 20, 20, 20), np.float32), "at least batch_size=2"),
    ],
)
def test_bad_files(tmp_path, make, match):
    np.save(tmp_path / "bad.npy", make())
    with pytest.raises(ValueError, match=match):
        GenesisPairDataset(str(tmp_path / "bad.npy"), 2, CONF)


def test_bad_cube_after_the_first_named_at_batch_time(tmp_path):
    a = np.zeros((2, 20, 20, 20), np.float32)
    a[1, 3, 3, 3] = 7.0
    np.save(tmp_path / "a.npy", a)
    ds = GenesisPairDataset(str(tmp_path / "a.npy"), 2, CONF)
    with pytest.raises(ValueError, match=r"a\.npy \(cube 1\).*max=7"):
        ds[0]


def test_bad_arguments(files, tmp_path):
    paths, _ = files
    np.save(tmp_path / "other.npy", ct_like(3, shape=(20, 20, 24)))
    cases = [
        (
            dict(cube_files=[paths[0], str(tmp_path / "other.npy")]),
            r"other\.npy with cubes of shape \(20, 20, 24\)",
        ),
        (dict(config=SimpleNamespace(local_rate=2.0)), "config.local_rate"),
        (dict(config=SimpleNamespace(paint_rate=float("nan"))), "config.paint_rate"),
        (dict(data_format="NCDHW"), "data_format"),
        (dict(status="valid"), "status"),
        (dict(steps=0), "steps"),
        (dict(seed=-1), "seed"),
        (dict(batch_size=13), "at least batch_size=13"),
        (dict(cube_files=[]), "at least one cube file"),
        (dict(cube_files=str(tmp_path / "missing.npy")), "missing.npy"),
    ]
    for kw, match in cases:
        args = dict(cube_files=paths, batch_size=2, config=CONF)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            GenesisPairDataset(
                args.pop("cube_files"), args.pop("batch_size"), args.pop("config"), **args
            )
    ds = GenesisPairDataset(paths, 2, CONF)
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)


@pytest.mark.multibackend
def test_epoch_set_from_callback_reaches_keras_workers(files):
    """The trainer's pattern: epoch_from_keras=False, set_epoch from on_epoch_begin."""
    import keras

    paths, _ = files
    calls = []

    class Recording(GenesisPairDataset):
        def __getitem__(self, index):
            calls.append((self.epoch, index))
            return super().__getitem__(index)

    ds = Recording(paths, 2, CONF, seed=0, steps=3, workers=2, epoch_from_keras=False)

    class SetEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            ds.set_epoch(epoch)
            calls.append(("begin", epoch))

    inp = keras.Input((1, 20, 20, 20))
    model = keras.Model(inp, keras.layers.Conv3D(1, 1, data_format="channels_first")(inp))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(ds, epochs=3, verbose=0, callbacks=[SetEpoch()])
    begins = [i for i, c in enumerate(calls) if c[0] == "begin"]
    assert len(begins) == 3
    for e, start in enumerate(begins):
        end = begins[e + 1] if e + 1 < 3 else len(calls)
        epoch_calls = calls[start + 1 : end]
        assert sorted(i for _, i in epoch_calls) == [0, 1, 2]
        assert all(ep == e for ep, _ in epoch_calls)
