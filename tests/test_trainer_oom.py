"""Out-of-memory detection and the smaller-batch retry (keras/genesis_trainer.py)."""

import os

import pytest

from genesis_trainer import is_oom_error, run_with_oom_retry
from pretraining_helpers import csv_rows, make_error, tiny_config, write_cubes


@pytest.mark.parametrize(
    "exc, expected",
    [
        (make_error("ResourceExhaustedError", "OOM when allocating tensor"), True),
        (
            make_error("XlaRuntimeError", "RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes"),
            True,
        ),
        (make_error("JaxRuntimeError", "RESOURCE_EXHAUSTED: Failed to allocate"), True),
        (make_error("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2 GiB"), True),
        (make_error("XlaRuntimeError", "INVALID_ARGUMENT: shapes differ"), False),
        (ValueError("bad value"), False),
        (MemoryError("host memory"), False),
    ],
)
def test_is_oom_error(exc, expected):
    assert is_oom_error(exc) is expected


def test_is_oom_error_sees_a_wrapped_error():
    try:
        try:
            raise make_error("ResourceExhaustedError", "OOM")
        except Exception as inner:
            raise RuntimeError("fit failed") from inner
    except RuntimeError as outer:
        assert is_oom_error(outer)


def test_oom_retry_lowers_the_batch_by_two(tmp_path, capsys):
    seen = []

    def fake_train(config, overwrite=False):
        seen.append((config.batch_size, overwrite))
        if config.batch_size > 2:
            raise make_error("XlaRuntimeError", "RESOURCE_EXHAUSTED: Out of memory")
        return "trained"

    config = tiny_config(tmp_path, batch_size=6)
    assert run_with_oom_retry(config, fake_train) == "trained"
    assert seen == [(6, False), (4, True), (2, True)]
    assert config.batch_size == 2
    out = capsys.readouterr().out
    assert "batch_size=6" in out and "retrying with batch_size=4" in out


def test_oom_retry_gives_up_at_batch_one(tmp_path):
    seen = []

    def always_oom(config, overwrite=False):
        seen.append(config.batch_size)
        raise make_error("ResourceExhaustedError", "OOM")

    with pytest.raises(RuntimeError, match="batch_size=3; no smaller"):
        run_with_oom_retry(tiny_config(tmp_path, batch_size=5), always_oom)
    assert seen == [5, 3]  # 1 is not tried, as the original's `while batch_size > 1`


def test_oom_in_setup_is_retried_and_reported_by_its_own_type(tmp_path, monkeypatch, capsys):
    """An OOM while the real `train` builds the model is retried, not taken for bad input."""
    import genesis_trainer

    write_cubes(tmp_path / "cubes")
    real_build = genesis_trainer.build_model
    seen = []

    def build_model(config):
        seen.append(config.batch_size)
        if len(seen) == 1:
            raise make_error("ResourceExhaustedError", "OOM")
        return real_build(config)

    monkeypatch.setattr(genesis_trainer, "build_model", build_model)
    config = tiny_config(tmp_path, batch_size=4, nb_epoch=1, steps_per_epoch=1, validation_steps=1)
    run_with_oom_retry(config)
    assert seen == [4, 2]
    assert "(ResourceExhaustedError); retrying with batch_size=2" in capsys.readouterr().out


def test_oom_retry_resumes_what_this_invocation_wrote(tmp_path):
    seen = []

    def fake_train(config, overwrite=False):
        seen.append((config.batch_size, config.resume))
        if len(seen) == 1:
            # The first attempt finished an epoch (checkpoint written) and then ran out.
            os.makedirs(config.model_path, exist_ok=True)
            open(os.path.join(config.model_path, config.exp_name + ".last.npz"), "w").close()
            raise make_error("OutOfMemoryError", "CUDA out of memory")
        return "ok"

    run_with_oom_retry(tiny_config(tmp_path, batch_size=4), fake_train)
    assert seen == [(4, False), (2, True)]


def test_other_errors_are_not_retried(tmp_path):
    calls = []

    def broken(config, overwrite=False):
        calls.append(1)
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        run_with_oom_retry(tiny_config(tmp_path), broken)
    assert len(calls) == 1


def test_oom_inside_real_fit_is_retried(tmp_path, monkeypatch, capsys):
    """The retry around the real `train`: fit raises a fake XLA OOM at batch 4, then works."""
    import keras

    write_cubes(tmp_path / "cubes")
    real_fit = keras.Model.fit
    batches = []

    def fit(self, x, *args, **kwargs):
        batches.append(x[0][0].shape[0])
        if len(batches) == 1:
            raise make_error(
                "XlaRuntimeError",
                "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB",
            )
        return real_fit(self, x, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    config = tiny_config(tmp_path, batch_size=4, nb_epoch=1, steps_per_epoch=1, validation_steps=1)
    run_with_oom_retry(config)
    assert batches == [4, 2]
    assert "retrying with batch_size=2" in capsys.readouterr().out
    rows = csv_rows(tmp_path / "w" / "Vnet-genesis_chest_ct.csv")
    assert [r["epoch"] for r in rows] == ["0"]
