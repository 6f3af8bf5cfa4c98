import numpy as np
import pytest
from PIL import Image

from autodfp.data import load_split, load_user_data, reward_split, shared_dir, to_tensor
from autodfp.errors import AutoDFPError


def test_lossless_test_set(lossless):
    assert lossless.x.shape == (1017, 32, 32, 3) and lossless.x.dtype == np.uint8
    assert lossless.y.shape == (1017,)
    assert set(np.unique(lossless.y)) == set(range(10))


def test_jpeg_test_set_is_in_official_order(jpeg_test, lossless):
    assert jpeg_test.x.shape == (10000, 32, 32, 3)
    assert np.array_equal(jpeg_test.y[:1017], lossless.y)
    # JPEG q75 of image i must resemble lossless image i far more than its neighbour.
    same = np.abs(jpeg_test.x[:1017].astype(int) - lossless.x.astype(int)).mean()
    shifted = np.abs(jpeg_test.x[1:1018].astype(int) - lossless.x.astype(int)).mean()
    assert same < 6 and shifted > 4 * same


def test_reward_split_is_stratified_seeded_and_from_training_images():
    a, b = reward_split(1000, seed=3), reward_split(1000, seed=3)
    c = reward_split(1000, seed=4)
    assert len(a) == 1000 and np.bincount(a.y).tolist() == [100] * 10
    assert np.array_equal(a.x, b.x) and not np.array_equal(a.x, c.x)
    train = load_split("train-jpeg")
    assert len(train) == 50000
    assert any(np.array_equal(a.x[0], img) for img in train.x[train.y == a.y[0]])


def test_reward_split_size_is_checked():
    with pytest.raises(AutoDFPError, match="reward set size"):
        reward_split(0)


def test_missing_shared_folder_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTODFP_SHARED", str(tmp_path / "nowhere"))
    with pytest.raises(AutoDFPError, match="shared data folder not found"):
        shared_dir()
    with pytest.raises(AutoDFPError):
        load_split("test-lossless")


def test_unknown_split():
    with pytest.raises(AutoDFPError, match="unknown data split"):
        load_split("validation")


def test_user_npz_and_image_folder(tmp_path, lossless):
    np.savez(tmp_path / "mine.npz", x=lossless.x[:20], y=lossless.y[:20])
    npz = load_user_data(tmp_path / "mine.npz")
    assert np.array_equal(npz.x, lossless.x[:20])
    for i in range(20):
        folder = tmp_path / "tree" / f"class{lossless.y[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lossless.x[i]).save(folder / f"{i:03d}.png")
    tree = load_user_data(tmp_path / "tree")
    assert len(tree) == 20 and tree.x.shape == (20, 32, 32, 3)
    # PNG is lossless: every image comes back exactly, labelled by sorted class folder.
    assert sorted(map(bytes, tree.x)) == sorted(map(bytes, lossless.x[:20]))
    with pytest.raises(AutoDFPError, match="not found"):
        load_user_data(tmp_path / "absent")
    np.savez(tmp_path / "bad.npz", x=lossless.x[:3].astype(np.float32), y=lossless.y[:3])
    with pytest.raises(AutoDFPError, match="uint8"):
        load_user_data(tmp_path / "bad.npz")


def test_to_tensor_normalises_per_model():
    x = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    t = to_tensor(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert t.shape == (2, 3, 4, 4)
    assert t[0, :, 0, 0].tolist() == pytest.approx([2.0, 1.0, 0.5])


def test_validation_split_is_stratified_and_disjoint_from_the_reward_split():
    from autodfp.data import validation_split

    reward = reward_split(200, seed=3)
    validation = validation_split(300, reward_size=200, seed=3)
    assert len(validation) == 300 and np.bincount(validation.y).tolist() == [30] * 10
    seen = {image.tobytes() for image in reward.x}
    assert not any(image.tobytes() in seen for image in validation.x)
    with pytest.raises(AutoDFPError, match="validation set size must be in 1..49800"):
        validation_split(49801, reward_size=200)
