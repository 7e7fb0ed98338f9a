"""UTKFace: names -> labels, the five quirky names, the hash split, bad input; real-data subsets."""
import shutil

import pytest
import torch

from taskloom.data import build_data
from taskloom.data.utkface import UTKFaceOptions, parse_name, split_of
from taskloom.errors import DataError
from taskloom.tasks import OrdinalExpectationTask, RegressionTask

from conftest import shared_path

DAMAGED = ["24_0_1_20170116220224657 .jpg.chip.jpg", "55_0_0_20170116232725357jpg.chip.jpg"]
NO_RACE = ["39_1_20170116174525125.jpg.chip.jpg", "61_1_20170109142408075.jpg.chip.jpg",
           "61_1_20170109150557335.jpg.chip.jpg"]


def test_parse_name():
    e = parse_name("26_1_2_20170116174525125.jpg.chip.jpg")
    assert (e.age, e.gender, e.race, e.damaged_suffix) == (26, 1, 2, False)
    for name in DAMAGED:
        assert parse_name(name).damaged_suffix
    assert (parse_name(DAMAGED[0]).age, parse_name(DAMAGED[1]).race) == (24, 0)
    for name in NO_RACE:
        with pytest.raises(ValueError, match="lacks the race field"):
            parse_name(name)
    for bad, message in [("26_2_0_2017.jpg.chip.jpg", "gender"), ("26_0_7_2017.jpg.chip.jpg", "race"),
                         ("face.jpg", "does not match")]:
        with pytest.raises(ValueError, match=message):
            parse_name(bad)


def test_split_is_a_fixed_function_of_the_name():
    assert split_of("1_0_0_20161219140627985.jpg.chip.jpg") == split_of("1_0_0_20161219140627985.jpg.chip.jpg")
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(2000):
        counts[split_of(f"{i}_0_0_x.jpg.chip.jpg")] += 1
    assert 1500 < counts["train"] < 1700 and 150 < counts["val"] < 250 and 150 < counts["test"] < 250


def test_real_names_have_exactly_the_documented_quirks():
    folder = shared_path("utkface64", "images")
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 23707
    malformed, damaged, splits = [], [], {"train": 0, "val": 0, "test": 0}
    for name in names:
        try:
            entry = parse_name(name)
        except ValueError:
            malformed.append(name)
            continue
        damaged += [name] if entry.damaged_suffix else []
        splits[split_of(name)] += 1
    assert malformed == sorted(NO_RACE) and damaged == sorted(DAMAGED)
    assert splits == {"train": 18929, "val": 2384, "test": 2391}  # 23,704 usable, about 80/10/10


def test_real_subset_loads_both_age_variants():
    root = shared_path("utkface64")
    data = build_data(UTKFaceOptions(root=str(root), limit=300))
    assert len(data.train) + len(data.val) + len(data.test) == 300
    assert data.input_shape == (3, 64, 64) and [t.name for t in data.tasks] == ["age", "gender", "race"]
    assert isinstance(data.tasks[0], RegressionTask)
    x, y = data.test[0]
    assert x.shape == (3, 64, 64) and 0 <= x.min() and x.max() <= 1 and x.std() > 0.05
    name = data.test.names[0]
    age, gender, race = (int(v) for v in name.split("_")[:3])
    assert (float(y["age"]), int(y["gender"]), int(y["race"])) == (age, gender, race)
    ordinal = build_data(UTKFaceOptions(root=str(root), limit=300, age_task="ordinal_expectation"))
    assert isinstance(ordinal.tasks[0], OrdinalExpectationTask) and ordinal.tasks[0].num_bins == 116
    assert torch.equal(ordinal.test.images, data.test.images)  # cached decode reused


def _fixture(tmp_path, normal=12):
    src = shared_path("utkface64", "images")
    folder = tmp_path / "utk" / "images"
    folder.mkdir(parents=True)
    names = sorted(p.name for p in src.iterdir() if p.name[0].isdigit())[:normal] + DAMAGED + NO_RACE
    for name in names:
        shutil.copy(src / name, folder / name)
    return tmp_path / "utk", names


def test_fixture_skips_the_three_names_without_race_by_default(tmp_path):
    root, names = _fixture(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 3 malformed file\(s\): 39_1_20170116174525125"):
        data = build_data(UTKFaceOptions(root=str(root)))
    kept = data.train.names + data.val.names + data.test.names
    assert len(kept) == len(names) - 3 and set(DAMAGED) <= set(kept)
    with pytest.raises(DataError, match=r"3 malformed file\(s\).*61_1_20170109142408075.*lacks the race field.*skip_malformed"):
        build_data(UTKFaceOptions(root=str(root), skip_malformed=False))


def test_corrupt_image_is_named_and_skipped_or_an_error(tmp_path):
    root, names = _fixture(tmp_path)
    for name in NO_RACE:
        (root / "images" / name).unlink()
    bad = names[3]
    (root / "images" / bad).write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(DataError, match=rf"{bad}: image cannot be decoded"):
        build_data(UTKFaceOptions(root=str(root), skip_malformed=False))
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        data = build_data(UTKFaceOptions(root=str(root)))
    assert bad not in data.train.names + data.val.names + data.test.names


def test_missing_or_empty_root(tmp_path, monkeypatch):
    monkeypatch.delenv("TASKLOOM_DATA", raising=False)
    with pytest.raises(DataError, match="no data folder given.*UTKFace"):
        build_data(UTKFaceOptions())
    (tmp_path / "utkface64").mkdir()
    monkeypatch.setenv("TASKLOOM_DATA", str(tmp_path))
    with pytest.raises(DataError, match="no .jpg images in .*AGE_GENDER_RACE_DATE"):
        build_data(UTKFaceOptions())


@pytest.mark.parametrize("name", ["single", "cross_stitch", "nddr"])
def test_configs_train_end_to_end_on_a_fixture(tmp_path, name):
    from taskloom import config as cfg
    from taskloom.architectures import ARCHITECTURES
    from taskloom.experiment import run

    config_file = f"configs/utkface/{name}.yaml"
    if name == "nddr" and "nddr" not in ARCHITECTURES:
        pytest.skip("the nddr architecture is not registered yet")
    root, _ = _fixture(tmp_path, normal=30)
    config = cfg.load(config_file, [f"data.root={root}", "train.epochs=1", "train.progress=false"])
    with pytest.warns(UserWarning, match="skipped 3 malformed"):
        final = run(config, tmp_path / "run", log=lambda *a: None)
    age = final["tasks"]["age"]
    assert "mae" in age and ("median_ae" in age) == (name == "nddr")
    assert "accuracy" in final["tasks"]["gender"] and "accuracy" in final["tasks"]["race"]
