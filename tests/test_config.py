from pathlib import Path

import pytest

from taskloom import config as cfg
from taskloom.architectures import CrossStitchOptions, SplitOptions
from taskloom.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_cross_stitch_run():
    c = cfg.load()
    assert c.data.name == "multimnist" and c.model.backbone.name == "lenet"
    assert isinstance(c.model.architecture, CrossStitchOptions)
    assert c.train.groups.fusion.lr_mult == 100 and c.train.groups.fusion.weight_decay == 0


def test_shipped_default_config_equals_the_built_in_default():
    assert cfg.to_dict(cfg.load(REPO / "configs/multimnist/cross_stitch.yaml")) == cfg.to_dict(cfg.load())


GRIDS = REPO / "configs" / "record"  # `taskloom compare` grids, not experiment configs


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").rglob("*.yaml") if GRIDS not in p.parents),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg.load(path)


@pytest.mark.parametrize("path", sorted(GRIDS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_record_grid_entry_validates(path):
    import json

    from taskloom.compare import load_grid

    grid = load_grid(path)
    for entry in grid.entries:
        arch = [f"model.architecture={json.dumps(entry['architecture'])}"]
        sweeps = [[]] + [[f"{key}={json.dumps(v)}"] for key, values in entry["sweep"].items() for v in values]
        for sweep in sweeps:
            cfg.load(grid.base, [*grid.overrides, *arch, *entry["overrides"], *sweep])


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "seed: 1\ntrain:\n  epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        cfg.load(path)
    message = str(err.value)
    assert f"{path}, line 4: train.learning_rate: unknown key" in message
    assert "valid keys here:" in message and "lr" in message


def test_typo_suggests_the_closest_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        cfg.load(write(tmp_path, "train:\n  epoch: 2\n"))


def test_wrong_type_and_bad_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"line 2: train.epochs: expected an integer, got 'ten'"):
        cfg.load(write(tmp_path, "train:\n  epochs: ten\n"))
    with pytest.raises(ConfigError, match=r"granularity: 'chanel' is not one of 'channel' \| 'layer' \(did you mean 'channel'\?\)"):
        cfg.load(write(tmp_path, "model:\n  architecture:\n    name: cross_stitch\n    granularity: chanel\n"))
    with pytest.raises(ConfigError, match="unknown architecture 'cross_stich'.*did you mean 'cross_stitch'"):
        cfg.load(write(tmp_path, "model:\n  architecture: cross_stich\n"))
    with pytest.raises(ConfigError, match="expected true or false"):
        cfg.load(write(tmp_path, "train:\n  deterministic: 1\n"))


def test_unquoted_on_and_off_are_the_choices_not_booleans(tmp_path):
    # YAML 1.1 reads `on`/`off` as true/false; where a choice is literally "on"/"off" that is what was meant
    assert cfg.load(write(tmp_path, "model:\n  batched_towers: on\n")).model.batched_towers == "on"
    assert cfg.load(None, ["model.batched_towers=off"]).model.batched_towers == "off"
    with pytest.raises(ConfigError, match="True is not one of 32"):  # only where on/off are the choices
        cfg.load(None, ["train.precision=on"])


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="line 2: not valid YAML"):
        cfg.load(write(tmp_path, "seed: 1\ntrain: epochs: 2\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        cfg.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping of config keys"):
        cfg.load(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_and_shorthand(tmp_path):
    c = cfg.load(None, ["model.architecture=split@2", "train.lr=0.5", "data.train_pairs=100"])
    assert isinstance(c.model.architecture, SplitOptions) and c.model.architecture.at == 2
    assert c.train.lr == 0.5 and c.data.train_pairs == 100 and c.data.name == "multimnist"
    c = cfg.load(write(tmp_path, "model:\n  architecture: cross_stitch\n"), ["model.architecture.granularity=layer"])
    assert c.model.architecture.granularity == "layer"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        cfg.load(None, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        cfg.load(None, ["train.lr=fast"])


def test_dump_round_trips(tmp_path):
    c = cfg.load(None, ["model.architecture=split@1", "train.loss_weights={left: 2.0}", "seed=3"])
    cfg.dump(c, tmp_path / "r.yaml")
    assert cfg.load(tmp_path / "r.yaml") == c


def test_cross_field_checks_name_the_section(tmp_path):
    with pytest.raises(ConfigError, match="data: val_fraction and test_fraction"):
        cfg.load(None, ["data.test_fraction=0.95"])
    with pytest.raises(ConfigError, match="members must be at least 1"):
        cfg.load(None, ["model.architecture={name: ensemble, members: 0}"])


def test_diff_lists_changed_keys():
    a = cfg.to_dict(cfg.load())
    b = cfg.to_dict(cfg.load(None, ["train.lr=0.1", "model.architecture.alpha_same=0.5"]))
    assert cfg.diff(a, b) == ["model.architecture.alpha_same", "train.lr"]


@pytest.mark.parametrize("group, key, value, kept", [
    ("fusion", "weight_decay", 0.0005, {"lr_mult": 100.0}),
    ("fusion", "lr_mult", 10.0, {"weight_decay": 0.0}),
    ("weighting", "lr_mult", 100.0, {"weight_decay": 0.0}),
    ("regularizer", "lr_mult", 3.0, {"weight_decay": 0.0}),
    ("backbone", "lr_mult", 2.0, {"weight_decay": None}),
])
def test_setting_one_field_of_a_parameter_group_keeps_that_groups_other_defaults(tmp_path, group, key, value, kept):
    """A partial mapping refines the group's own defaults (ParamGroups' default factories), not
    GroupOptions' class defaults; the same through an override and a YAML file."""
    from_override = cfg.load(None, [f"train.groups.{group}.{key}={value}"])
    from_file = cfg.load(write(tmp_path, f"train:\n  groups:\n    {group}: {{{key}: {value}}}\n"))
    for c in (from_override, from_file):
        options = getattr(c.train.groups, group)
        assert getattr(options, key) == value
        for field, default in kept.items():
            assert getattr(options, field) == default, (group, field)
    defaults = cfg.ParamGroups()
    for other in ("backbone", "fusion", "head", "weighting", "regularizer"):
        if other != group:  # the groups the config does not mention keep all of their defaults
            assert getattr(from_override.train.groups, other) == getattr(defaults, other)


def test_partial_mapping_starts_from_the_default_factorys_value():
    """The general rule behind the groups: any dataclass field whose default comes from a
    default_factory, at any depth, and a tagged field refined without naming its entry."""
    import dataclasses

    @dataclasses.dataclass
    class Inner:
        a: int = 1
        b: int = 2

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=lambda: Inner(a=10, b=20))

    @dataclasses.dataclass
    class Top:
        outer: Outer = dataclasses.field(default_factory=Outer)

    built = cfg._build_dataclass(Top, {"outer": {"inner": {"b": 5}}}, cfg._Where(None, {}))
    assert built.outer.inner == Inner(a=10, b=5)
    assert cfg._build_dataclass(Top, {"outer": {"inner": None}}, cfg._Where(None, {})).outer.inner == Inner(10, 20)
    c = cfg.load(None, ["model.architecture.granularity=layer"])  # the cross-stitch default, refined
    assert isinstance(c.model.architecture, CrossStitchOptions) and c.model.architecture.granularity == "layer"
    assert cfg.load(None, ["model.architecture={name: split, at: 1}"]).model.architecture == SplitOptions(at=1)
