"""MTFL: annotation quirks, crop rule, flips, splits, bad input; quick subsets of the real data."""
import shutil

import numpy as np
import pytest
import torch

from taskloom.data import build_data
from taskloom.data.mtfl import (MTFLOptions, face_box, flip_sample, parse_line, read_annotations, to_image_coords,
                                validation_index)
from taskloom.errors import DataError

from conftest import shared_path

LINE = " lfw_5590\\Aaron_Eckhart_0001.jpg 54.912000 75.648000 64.640000 54.400000 72.064000 55.680000 57.984000 73.600000 81.280000 83.328000 1 2 2 3\r\n"


def test_parse_line_handles_the_quirks_and_maps_labels():
    rec = parse_line(LINE, "training.txt", 1)
    assert rec.path == "lfw_5590/Aaron_Eckhart_0001.jpg"  # \ -> /, leading space and CRLF gone
    assert rec.landmarks.shape == (5, 2) and rec.landmarks[0].tolist() == [54.912, 55.68]
    assert rec.attributes.tolist() == [0, 0, 0, 2]  # male, not smiling, no glasses, frontal
    rec = parse_line("AFLW/x.jpg " + " ".join(["1"] * 10) + " 2 1 1 5", "testing.txt", 7)
    assert rec.attributes.tolist() == [1, 1, 1, 4]


@pytest.mark.parametrize("bad, message", [
    (LINE.replace(" 3\r\n", "\r\n"), "expected 15 fields .* got 14"),
    (LINE.replace("54.912000", "abc"), "must be numbers"),
    (LINE.replace(" 1 2 2 3", " 1 2 2 6"), "pose must be one of"),
    (LINE.replace(" 1 2 2 3", " 0 2 2 3"), "gender must be one of"),
])
def test_parse_line_rejects_malformed_lines(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_line(bad, "training.txt", 3)


def test_face_box_rule_and_mapping_back():
    lm = np.array([[10.0, 20.0], [30.0, 20.0], [20.0, 30.0], [12.0, 40.0], [28.0, 40.0]])
    x0, y0, side = face_box(lm, 2.2)
    # centre = mean (20, 30); larger extent = max(20, 20) = 20; side 44
    assert (x0, y0, side) == pytest.approx((20 - 22, 30 - 22, 44))
    norm = torch.from_numpy((lm - [x0, y0]) / side)[None]
    back = to_image_coords(norm, torch.tensor([[x0, y0, side]], dtype=torch.float64))
    assert torch.allclose(back[0], torch.from_numpy(lm))


def test_flip_swaps_left_right_landmarks_and_mirrors_pose():
    x = torch.zeros(1, 40, 40)
    x[0, 12, 10] = 1.0  # a bright pixel at the left eye
    points = torch.tensor([[10.5, 12.5], [29.0, 12.5], [20.0, 22.0], [14.0, 30.0], [26.0, 31.0]]) / 40
    fx, fp, fa = flip_sample(x, points, torch.tensor([0, 1, 0, 1]))
    assert fx[0, 12, 29] == 1.0  # the pixel moved to the mirrored column
    # the old left eye is now the right eye, at the mirrored column's centre
    assert fp[1].tolist() == pytest.approx([29.5 / 40, 12.5 / 40])
    assert fp[0].tolist() == pytest.approx([1 - 29.0 / 40, 12.5 / 40])
    assert fp[3].tolist() == pytest.approx([1 - 26 / 40, 31 / 40]) and fp[4].tolist() == pytest.approx([1 - 14 / 40, 30 / 40])
    assert fa.tolist() == [0, 1, 0, 3]  # pose: left (1) -> right (3); other labels kept
    for pose, mirrored in [(0, 4), (2, 2), (4, 0), (3, 1)]:
        assert flip_sample(x, points, torch.tensor([0, 0, 0, pose]))[2][3] == mirrored
    back = flip_sample(fx, fp, fa)
    assert torch.equal(back[0], x) and torch.allclose(back[1], points) and torch.equal(back[2], torch.tensor([0, 1, 0, 1]))


def test_validation_split_depends_on_names_only():
    paths = [f"img{i}.jpg" for i in range(50)]
    val = validation_index(paths, 10)
    shuffled = paths[::-1]
    assert sorted(paths[i] for i in val) == sorted(shuffled[i] for i in validation_index(shuffled, 10))
    assert len(val) == 10 and len(set(val.tolist())) == 10


# --------------------------------------------------------------------------- real data


def test_real_subset_loads_with_the_default_protocol():
    root = shared_path("mtfl")
    records, problems = read_annotations(root / "training.txt", limit=200)
    assert len(records) == 200 and not problems
    data = build_data(MTFLOptions(root=str(root), limit=200, val_size=40))
    assert (len(data.train), len(data.val), len(data.test)) == (160, 40, 200)
    assert data.input_shape == (1, 40, 40)
    assert [t.name for t in data.tasks] == ["landmarks", "gender", "smile", "glasses", "pose"]
    assert set(data.train.paths).isdisjoint(data.val.paths)
    x, y = data.val[0]
    assert x.shape == (1, 40, 40) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y["landmarks"].shape == (5, 2) and y["pose"].dtype == torch.int64
    lm = data.test.landmarks
    # crop rule: centred on the landmarks' mean, side 2.2 x their larger extent
    assert torch.allclose(lm.mean(1), torch.full((200, 2), 0.5), atol=1e-5)
    extent = (lm.amax(1) - lm.amin(1)).amax(1)
    assert torch.allclose(extent, torch.full((200,), 1 / 2.2), atol=1e-5)
    assert (lm[:, 0, 0] < lm[:, 1, 0]).float().mean() > 0.95  # left eye left of the right eye
    # mapping predictions back gives the annotated pixel coordinates
    test_records, _ = read_annotations(root / "testing.txt", limit=200)
    back = to_image_coords(lm.double(), data.test.boxes)
    assert torch.allclose(back[5], torch.from_numpy(test_records[5].landmarks), atol=1e-4)
    assert test_records[0].path.startswith("AFLW/") and records[0].path.startswith("lfw_5590/")


def test_real_subset_flips_only_training_samples():
    data = build_data(MTFLOptions(root=str(shared_path("mtfl")), limit=100, val_size=20))
    torch.manual_seed(1)
    flipped = sum(not torch.equal(data.train[0][0], data.train.images[0].float() / 255) for _ in range(20))
    assert 3 < flipped < 17
    assert all(torch.equal(data.val[0][0], data.val.images[0].float() / 255) for _ in range(5))


# --------------------------------------------------------------------------- bad input


def _fixture(tmp_path, train_lines=4, test_lines=2):
    """A tiny MTFL folder with real images and the real files' quirks (copied into tmp only)."""
    src = shared_path("mtfl")
    lines = {name: [l for l in (src / name).read_text().splitlines() if l.strip()] for name in ("training.txt", "testing.txt")}
    root = tmp_path / "mtfl"
    chosen = {"training.txt": lines["training.txt"][:train_lines], "testing.txt": lines["testing.txt"][:test_lines]}
    for name, picked in chosen.items():
        for line in picked:
            rel = line.split()[0].replace("\\", "/")
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / rel, root / rel)
        (root / name).write_bytes(("\r\n ".join(picked) + "\r\n ").encode())
    return root, chosen


def _rewrite(root, name, index, line):
    lines = [l for l in (root / name).read_bytes().decode().split("\r\n") if l.strip()]
    lines[index] = line
    (root / name).write_bytes(("\r\n ".join(lines) + "\r\n").encode())


def test_fixture_loads(tmp_path):
    root, _ = _fixture(tmp_path)
    data = build_data(MTFLOptions(root=str(root), val_size=1))
    assert (len(data.train), len(data.val), len(data.test)) == (3, 1, 2)


def test_corrupt_jpeg_names_file_and_line(tmp_path):
    root, chosen = _fixture(tmp_path)
    rel = chosen["training.txt"][1].split()[0].replace("\\", "/")
    (root / rel).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"training.txt, line 2: image .*cannot be decoded"):
        build_data(MTFLOptions(root=str(root), val_size=1))
    with pytest.warns(UserWarning, match="skipped 1 bad"):
        data = build_data(MTFLOptions(root=str(root), val_size=1, skip_malformed=True))
    assert len(data.train) + len(data.val) == 3


def test_truncated_jpeg_is_an_error_too(tmp_path):
    root, chosen = _fixture(tmp_path)
    rel = chosen["testing.txt"][0].split()[0]
    data = (root / rel).read_bytes()
    (root / rel).write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"testing.txt, line 1: image .*cannot be decoded"):
        build_data(MTFLOptions(root=str(root), val_size=1))


def test_line_with_14_fields_names_file_and_line(tmp_path):
    root, chosen = _fixture(tmp_path)
    _rewrite(root, "training.txt", 2, chosen["training.txt"][2].rsplit(" ", 1)[0])
    with pytest.raises(DataError, match=r"training.txt, line 3: expected 15 fields .*got 14"):
        build_data(MTFLOptions(root=str(root), val_size=1))


def test_landmark_outside_the_image_names_file_and_line(tmp_path):
    root, chosen = _fixture(tmp_path)
    parts = chosen["testing.txt"][1].split()
    parts[1] = "500.0"  # x of the left eye, beyond the 128-pixel image
    _rewrite(root, "testing.txt", 1, " ".join(parts))
    with pytest.raises(DataError, match=r"testing.txt, line 2: landmark left_eye at \(500, .*outside the 128x128 image"):
        build_data(MTFLOptions(root=str(root), val_size=1))


def test_missing_image_names_file_and_line_or_is_skipped(tmp_path):
    root, chosen = _fixture(tmp_path)
    (root / chosen["training.txt"][3].split()[0].replace("\\", "/")).unlink()
    with pytest.raises(DataError, match=r"training.txt, line 4: image .* not found"):
        build_data(MTFLOptions(root=str(root), val_size=1))
    with pytest.warns(UserWarning, match="skipped 1 bad"):
        data = build_data(MTFLOptions(root=str(root), val_size=1, skip_malformed=True))
    assert len(data.train) == 2


def test_missing_root_or_annotation_file_says_what_to_get(tmp_path, monkeypatch):
    monkeypatch.delenv("TASKLOOM_DATA", raising=False)
    with pytest.raises(DataError, match="--data-root.*TASKLOOM_DATA.*MTFL"):
        build_data(MTFLOptions())
    with pytest.raises(DataError, match="does not exist"):
        build_data(MTFLOptions(root=str(tmp_path / "nowhere")))
    (tmp_path / "mtfl").mkdir()
    (tmp_path / "mtfl" / "training.txt").write_text("")
    with pytest.raises(DataError, match=r"incomplete: testing.txt not found.*MTFL"):
        build_data(MTFLOptions(root=str(tmp_path / "mtfl")))
    monkeypatch.setenv("TASKLOOM_DATA", str(tmp_path))
    with pytest.raises(DataError, match="incomplete"):  # $TASKLOOM_DATA/mtfl is used
        build_data(MTFLOptions())


@pytest.mark.parametrize("name", ["single_landmarks", "single", "cross_stitch"])
def test_configs_train_end_to_end_on_a_fixture(tmp_path, name):
    import json

    from taskloom import config as cfg
    from taskloom.experiment import run

    root, _ = _fixture(tmp_path, train_lines=6, test_lines=3)
    config = cfg.load(f"configs/mtfl/{name}.yaml", [f"data.root={root}", "data.val_size=2", "train.epochs=1",
                                                   "train.progress=false"])
    final = run(config, tmp_path / "run", log=lambda *a: None)
    saved = json.loads((tmp_path / "run" / "final.json").read_text())
    lm = saved["tasks"]["landmarks"]
    assert len(lm["error_iod_per_landmark"]) == 5 and len(lm["failure_box_per_landmark"]) == 5
    assert {"mean_error_iod", "failure_iod", "mean_error_box", "failure_box"} <= set(lm)
    if name != "single_landmarks":
        assert {"gender", "smile", "glasses", "pose"} <= set(final["tasks"])
        assert 0 <= saved["tasks"]["glasses"]["accuracy"] <= 1
