"""Property tests of every reader that takes files from users or from earlier runs: whatever
the bytes, each one either loads or raises :class:`AutoDFPError` (one clear line), never
anything else. Small example budgets keep CI fast."""

from __future__ import annotations

import io
import json
import math
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autodfp.calibrate.refit import CalibrationConfig
from autodfp.data import load_unlabeled, load_user_data
from autodfp.errors import AutoDFPError
from autodfp.models import get_spec
from autodfp.models.checkpoint import read_state_dict
from autodfp.strategy import Strategy
from launch.config import SearchConfig
from launch.search import load_best, load_episodes

FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = (st.none() | st.booleans() | st.integers(-10, 10**6) | st.text(max_size=8)
                | st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)


def loads_or_says_why(read, *args, **kwargs):
    """Run a reader: it may succeed or raise AutoDFPError with a one-line message."""
    try:
        return read(*args, **kwargs)
    except AutoDFPError as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        return None


# --- strategy JSON ----------------------------------------------------------------------

VALID_STRATEGY = {
    "format": "autodfp-strategy/1", "model": "resnet20", "checkpoint": None,
    "checkpoint_sha256": None, "select": "l1", "reconstruct": "neuron-merging", "options": {},
    "layers": {"layer1.0.conv1": {"keep": 0.5, "coef": 1.0}},
    "calibration": {"order": "refit", "count": 8},
}
FIELDS = list(VALID_STRATEGY) + ["layers.keep", "layers.coef", "calibration.count",
                                 "calibration.ridge", "extra"]


@FAST
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_strategy_with_any_field_replaced_loads_or_fails_cleanly(field, value):
    data = json.loads(json.dumps(VALID_STRATEGY))
    if field.startswith("layers."):
        data["layers"]["layer1.0.conv1"][field.split(".")[1]] = value
    elif field.startswith("calibration."):
        data["calibration"][field.split(".")[1]] = value
    else:
        data[field] = value
    strategy = loads_or_says_why(Strategy.from_dict, data)
    if strategy is not None:
        for action in strategy.layers.values():
            assert 0 < action.keep <= 1 and 0 <= action.coef <= 1
            assert math.isfinite(action.keep) and math.isfinite(action.coef)


@FAST
@given(text=st.text(max_size=200) | st.sampled_from(["", "{", "[]", "null", '{"format": 1}']))
def test_strategy_file_of_any_text_loads_or_fails_cleanly(tmp_path, text):
    path = tmp_path / "strategy.json"
    path.write_text(text)
    loads_or_says_why(Strategy.load, path)


@FAST
@given(data=st.dictionaries(st.sampled_from(["episodes", "env", "num_env_runners", "gamma",
                                             "name", "warmup_episodes"]), json_values,
                            max_size=3))
def test_search_config_of_any_values_loads_or_fails_cleanly(data):
    loads_or_says_why(SearchConfig.from_dict, data)


@FAST
@given(data=st.dictionaries(st.sampled_from(["order", "count", "ridge", "positions", "synth",
                                             "refit_producers"]), json_values, max_size=3))
def test_calibration_config_of_any_values_loads_or_fails_cleanly(data):
    loads_or_says_why(CalibrationConfig.from_dict, data)


# --- run folders: best.json and episodes.jsonl -------------------------------------------

def run_folder(root: Path) -> Path:
    run = root / "run"
    trial = run / "AutoDFPSAC_trial"
    trial.mkdir(parents=True, exist_ok=True)
    (run / "search.json").write_text(json.dumps({"name": "run", "env": {"model": "resnet20"}}))
    return trial


GOOD_EPISODE = {"episode": 1, "iteration": 1, "accuracy": 0.5, "macs_ratio": 0.49,
                "keep": [0.5], "coef": [1.0], "timing": {}, "time": 1.0}


@FAST
@given(lines=st.lists(st.binary(max_size=40) | st.just(json.dumps(GOOD_EPISODE).encode()),
                      max_size=6),
       torn=st.integers(0, 60))
def test_episodes_jsonl_with_torn_or_garbled_lines_keeps_the_good_ones(tmp_path, lines, torn):
    trial = run_folder(tmp_path)
    good = json.dumps(GOOD_EPISODE).encode()
    blob = b"\n".join(lines) + b"\n" + good[:torn]  # a last line torn by a kill
    (trial / "episodes.jsonl").write_bytes(blob)
    episodes = load_episodes(tmp_path / "run")
    assert all(e["accuracy"] == 0.5 for e in episodes)
    assert len(episodes) >= sum(line == good for line in lines)


@FAST
@given(content=st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()))
def test_best_json_of_any_content_loads_or_fails_cleanly(tmp_path, content):
    trial = run_folder(tmp_path)
    (trial / "best.json").write_bytes(content)
    best = loads_or_says_why(load_best, tmp_path / "run")
    assert best is None or isinstance(best["strategy"], dict)


# --- checkpoints truncated anywhere ---------------------------------------------------------

CHECKPOINT = get_spec("resnet20").default_checkpoint().read_bytes()


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(CHECKPOINT) - 1))
def test_truncated_checkpoint_fails_cleanly(tmp_path, cut):
    path = tmp_path / "cut.th"
    path.write_bytes(CHECKPOINT[:cut])
    with pytest.raises(AutoDFPError, match="cannot load checkpoint|holds no state_dict"):
        read_state_dict(path)


# --- user images: .npz and folders ------------------------------------------------------------

dtypes = st.sampled_from([np.uint8, np.float32, np.int64, np.bool_])
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)


@FAST
@given(x_dtype=dtypes, x_shape=shapes, y_dtype=dtypes, y_shape=shapes,
       keys=st.sampled_from([("x", "y"), ("x",), ("images", "labels")]))
def test_npz_of_any_arrays_loads_or_fails_cleanly(tmp_path, x_dtype, x_shape, y_dtype, y_shape,
                                                  keys):
    arrays = dict(zip(keys, (np.zeros(x_shape, x_dtype), np.zeros(y_shape, y_dtype))))
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    data = loads_or_says_why(load_user_data, path)
    if data is not None:
        assert data.x.dtype == np.uint8 and data.x.shape[-1] == 3 and len(data.x) == len(data.y)
    calib = loads_or_says_why(load_unlabeled, path, (3, 4, 4), count=1)
    if calib is not None:
        assert calib.shape == (1, 4, 4, 3)


@FAST
@given(content=st.binary(max_size=100))
def test_npz_of_any_bytes_fails_cleanly(tmp_path, content):
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    assert loads_or_says_why(load_user_data, path) is None


def _png(size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@FAST
@given(files=st.lists(st.tuples(st.sampled_from(["a.png", "b.jpg", "notes.txt", "c.PNG"]),
                                st.sampled_from([b"", b"not an image", _png(4), _png(5)])),
                      min_size=1, max_size=4))
def test_image_folder_with_non_image_files_loads_or_fails_cleanly(tmp_path, files):
    root = Path(tempfile.mkdtemp(dir=tmp_path))  # one fresh tree per example
    for i, (name, content) in enumerate(files):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    data = loads_or_says_why(load_user_data, root)
    if data is not None:
        assert len(data.x) == len(data.y) > 0
    loads_or_says_why(load_unlabeled, root, (3, 4, 4), count=1)


def test_zip_that_is_not_an_npz_fails_cleanly(tmp_path):
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"garbage")
    assert loads_or_says_why(load_user_data, path) is None
