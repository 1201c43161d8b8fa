"""The whole config is validated before anything is rendered or trained."""

import glob
import os

import ml_collections
import pytest
from tests.eval.tiny import set_keys

from jaxadapt import config as defaults
from jaxadapt.eval import cli, protocol, study, validation
from jaxadapt.eval.sweep_checks import SWEEP_SYNTAX, sweep_problems


def _cfg(**changes):
    return set_keys(defaults.get_defaults(), changes)


def _problems(**changes):
    return validation.problems(_cfg(**changes))


CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob("configs/*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_study_config_is_valid_in_both_variants(name):
    for variant in ("cpu", "gpu"):
        cfg = cli.load_config_file(f"configs/{name}.py:{variant}")
        assert validation.problems(cfg) == [], (name, variant)
        validation.validate(cfg)
    assert len(CONFIGS) >= 5


def test_defaults_are_valid():
    assert _problems() == []


# (key, bad value, text the message must hold besides `config.<key>=<value>`)
BAD_FIELDS = [
    ("eval.batch_size", 0, "--config.eval.batch_size=32"),
    ("eval.unit", "well", "'plate', 'batch', 'source'"),
    ("eval.seed", -1, "integer >= 0"),
    ("train.batch_size", 0, "integer >= 1"),
    ("train.learning_rate", 0.0, "number > 0"),
    ("train.learning_rate", float("nan"), "number > 0"),
    ("train.num_epochs", 0, "integer >= 1"),
    ("train.patience", 0, "integer >= 1"),
    ("data.crop_size", 0, "integer >= 1"),
    ("data.num_threads", 0, "integer >= 1"),
    ("model.width", 0, "integer >= 1"),
    ("model.stem", "tiny", "'imagenet', 'small'"),
    ("arm.episodes_per_step", 0, "integer >= 1"),
    ("arm.n_perturbed", 0, "integer >= 1"),
    ("arm.n_controls", -1, "integer >= 0"),
    ("arm.on_missing_controls", "Skip", "'raise', 'skip'"),
    ("adapt.n_controls", -1, "integer >= 0"),
    ("adapt.on_missing_controls", "skip", "'raise', 'perturbed_only'"),
    ("adapt.on_short_controls", "skip", "'raise', 'resample'"),
    ("adapt.tent_lr", -1e-3, "number > 0"),
    ("adapt.plate_chunk_size", 0, "integer >= 1"),
    ("study", "", "non-empty string"),
]


@pytest.mark.parametrize("key,value,fix", BAD_FIELDS)
def test_each_bad_field_is_named_with_value_and_fix(key, value, fix):
    found = _problems(**{key: value})
    assert len(found) == 1, found
    assert f"config.{key}={value!r}" in found[0] and fix in found[0]


@pytest.mark.parametrize("key,value,fix", [
    ("seeds", (0, -1), "invalid seed -1; use integers >= 0"),
    ("seeds", (0, 0), "twice"),
    ("seeds", (), "non-empty tuple"),
    ("methods", ("erm", "ermm"), "unknown method 'ermm'; use some of ('adabn'"),
    ("methods", ("erm,tent",), "pass a tuple, e.g. --config.methods="),
    ("train_sources", ("source_9",),
     "unknown source 'source_9'; use some of config.data.sim.sources=('source_3', 'source_8')"),
    ("eval_splits", ("in_domain", "test"), "unknown split 'test'; use some of ('train'"),
    ("eval_splits", ("source:source_3",), "unknown split 'source:source_3'; use some of "
     "('train', 'validation', 'in_domain', 'new_batch', 'new_source') or source pairs"),
])
def test_bad_study_lists_are_named(key, value, fix):
    found = _problems(**{key: value})
    assert len(found) == 1 and f"config.{key}={value!r}" in found[0] and fix in found[0], found


def test_fields_that_must_agree_with_the_simulated_design():
    assert "exceeds config.data.sim.image_size=64" in _problems(**{"data.crop_size": 80})[0]
    assert "set --config.model.num_classes=8" in _problems(**{"model.num_classes": 4})[0]
    assert "set --config.model.in_channels=5" in _problems(**{"model.in_channels": 3})[0]
    one_source = _problems(**{"data.sim.sources": ("source_3",)})
    assert "no source besides the training source 'source_3'" in one_source[0]
    assert _problems(**{"data.sim.sources": ("source_3",),
                        "eval_splits": ("in_domain", "new_batch")}) == []
    # 6 batches: 1 validation + 5 new-batch leave none to train on.
    assert "at least 1 training batch" in _problems(**{"splits.new_batch_batches": 5})[0]
    assert "splits.in_domain_fraction=1.5" in _problems(**{"splits.in_domain_fraction": 1.5})[0]


def test_jump_target2_preset_is_validated_with_its_own_class_count():
    from jaxadapt.data.sim import design

    cfg = _cfg()
    cfg.data.sim = design.default_sim_config("jump_target2")
    found = validation.problems(cfg)
    assert len(found) == 1 and "jump_target2 simulator has 58 classes" in found[0]
    assert "set --config.model.num_classes=58" in found[0]
    cfg.model.num_classes = 58
    assert validation.problems(cfg) == []
    cfg.data.sim.sources = ("source_3", "source_1")
    assert "'source_1', which has no TARGET2 plates" in validation.problems(cfg)[0]


def test_simulator_checks_are_reused_and_named_by_their_config_key():
    found = _problems(**{"data.sim.severity.batch": -1.0})
    assert found == ["config.data.sim.severity.batch=-1.0 must be >= 0 (0 turns it off)"]
    assert "config.data.sim.image_size=8" in _problems(**{"data.sim.image_size": 8})[0]
    assert "model.name='resnet7'" in _problems(**{"model.name": "resnet7"})[0]


def test_all_problems_are_reported_together():
    err = pytest.raises(validation.ConfigError, validation.validate, _cfg(**{
        "eval.batch_size": 0, "train.learning_rate": 0.0, "sweep": ({"L": 0},)}))
    assert isinstance(err.value, ValueError) and len(err.value.problems) == 3
    keys = ("config.eval.batch_size=0", "config.train.learning_rate=0.0", "L=0")
    assert all(any(k in p for p in err.value.problems) for k in keys)
    assert str(err.value).count("\n") == 2  # one line per problem


def test_batches_split_over_devices_only_for_the_trainers_that_split_them():
    # conftest fakes 8 devices: ERM's batches must divide by 8, episodic trainers' need not.
    found = _problems(**{"train.batch_size": 12})
    assert len(found) == 1 and "multiple of the 8 local devices" in found[0]
    assert "--config.train.batch_size=8" in found[0]
    assert _problems(**{"train.batch_size": 12, "methods": ("arm_bn", "cs_arm_bn")}) == []


@pytest.mark.parametrize("sweep,fix", [
    (("L", "N"), "single dict on the command line is read as its keys"),
    ((("L", 16), ("N", 128)), "is a tuple, not a dict"),
    (('{"L": 16}',), "is a str, not a dict"),
    (({"L": 0},), "L=0; use an integer >= 1"),
    (({"L": 2.5},), "L=2.5; use an integer >= 1"),
    (({"L": True},), "L=True; use an integer >= 1"),
    (({"N": -1},), "N=-1; use an integer >= 0"),
    (({"alpha": 0},), "alpha=0; use a number > 0 or 'balanced'"),
    (({"alpha": "skewed"},), "alpha='skewed'"),
    (({"unit": "well"},), "unit='well'; use one of ('plate', 'batch', 'source')"),
    (({"M": 3},), "unknown key 'M'; known keys: L"),
])
def test_malformed_sweeps_are_named_with_the_right_syntax(sweep, fix):
    found = sweep_problems(sweep)
    assert len(found) == 1 and fix in found[0], found
    assert found[0].startswith("config.sweep")
    if not isinstance(sweep[0], dict):
        assert SWEEP_SYNTAX in found[0]


def test_sweep_given_as_string_or_single_dict_shows_syntax():
    for bad in ('({"L": 16},)', {"L": 16}, 16):
        found = sweep_problems(bad)
        assert len(found) == 1 and SWEEP_SYNTAX in found[0]


def test_valid_sweeps_pass_including_config_dict_settings():
    ok = ({"L": 1, "N": 0}, {"alpha": "balanced", "N": 128}, {"alpha": 0.01, "unit": "batch"},
          ml_collections.ConfigDict({"L": 4}), {})
    assert sweep_problems(ok) == []
    assert sweep_problems(()) == [] and sweep_problems(None) == []
    assert protocol.swept_settings(_cfg(sweep=ok))[3] == {"L": 4}


@pytest.fixture
def nothing_may_run(monkeypatch):
    """Fails the test if data is loaded (rendered) or a trainer is built."""
    def forbidden(*args, **kwargs):
        raise AssertionError("rendering or training started before the config was validated")
    monkeypatch.setattr(study.worlds, "load_world", forbidden)
    monkeypatch.setattr(study.registry, "build_trainers", forbidden)


@pytest.mark.parametrize("changes,match", [
    ({"eval.batch_size": 0}, "config.eval.batch_size=0"),
    ({"sweep": ("L", "N")}, "holds key names"),
    ({"sweep": ('{"L": 16, "N": 128}',)}, "not a dict"),
])
def test_study_fails_before_rendering_or_training(tmp_path, nothing_may_run, changes, match):
    cfg = _cfg(**{"data.cache_dir": str(tmp_path / "cache")}, **changes)
    with pytest.raises(validation.ConfigError, match=match):
        study.run_study(cfg, str(tmp_path / "run"))
    rep = protocol.Replicate("source_3", 0)
    with pytest.raises(validation.ConfigError, match=match):
        study.load_replicate(cfg, "erm", rep, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "run")


def test_source_pair_splits_are_validated():
    matrix = ("source:source_3->source_3", "source:source_3->source_8", "new_source")
    assert _problems(eval_splits=matrix) == []
    found = _problems(eval_splits=("source:source_3->source_99",))
    assert found == ["config.eval_splits: 'source:source_3->source_99' names unknown source(s) "
                     "['source_99']; valid sources: config.data.sim.sources=('source_3', "
                     "'source_8')"]
    found = _problems(eval_splits=("source:source_8->source_3",))
    assert len(found) == 1 and "trained on 'source_8', which config.train_sources=" \
        "('source_3',) does not train" in found[0]
    assert _problems(eval_splits=("source:source_8->source_3",),
                     train_sources=("source_3", "source_8")) == []


def test_adapt_on_is_validated_with_the_methods_that_can_use_it():
    assert _problems(**{"eval.adapt_on": "first_plate", "methods": ("erm", "adabn_plate", "ben",
                                                                    "cs_arm_bn_plate")}) == []
    found = _problems(**{"eval.adapt_on": "third_plate"})
    assert len(found) == 1 and "config.eval.adapt_on='third_plate'" in found[0] \
        and "'unit', 'first_plate', 'first_batch'" in found[0]
    found = _problems(**{"eval.adapt_on": "first_plate", "methods": ("adabn", "erm")})
    assert found == ["method 'adabn' adapts on the very batches it scores, so it cannot adapt on "
                     "adapt_on='first_plate' and score the whole unit; score it with "
                     "adapt_on='unit' or use a method that adapts once per unit (e.g. "
                     "adabn_plate, ben, cs_arm_bn_plate)"]
    found = _problems(sweep=({"adapt_on": "plate:P1"},), methods=("tent",))
    assert len(found) == 1 and "method 'tent'" in found[0]
    found = _problems(sweep=({"adapt_on": "plates"},))
    assert len(found) == 1 and "adapt_on='plates'" in found[0] and "adaptation subset" in found[0]


def test_batches_and_episodes_must_split_over_processes_too(monkeypatch):
    # As if on 2 hosts with 8 devices each: every batch is read in 2 shares of 8 devices.
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    found = _problems(**{"train.batch_size": 8, "train.eval_batch_size": 32})
    assert found == ["config.train.batch_size=8 (rows) does not split over 2 processes x 8 "
                     "devices per process = 16 devices: each process reads its own equal "
                     "share of every batch and splits it over its devices; set it to a "
                     "multiple of 16, e.g. --config.train.batch_size=16, or run on fewer "
                     "processes or devices"]
    found = _problems(**{"methods": ("cs_arm_bn",), "arm.episodes_per_step": 8})
    assert len(found) == 1 and found[0].startswith(
        "config.arm.episodes_per_step=8 (episodes) does not split over 2 processes x 8 "
        "devices per process = 16 devices")
    assert _problems(**{"methods": ("cs_arm_bn",), "arm.episodes_per_step": 16}) == []


def _dino_study(**changes):
    c = cli.load_config_file("configs/dino_pretrain.py")
    with c.unlocked():
        return set_keys(c, changes)


@pytest.mark.parametrize("changes, needle", [
    ({"dino.views.global_size": 72}, "config.dino.views.global_size=72 exceeds the image size 64x64"),
    ({"dino.views.local_size": 20}, "config.dino.views.local_size=20 is not a multiple of the patch size 8"),
    ({"data.crop_size": 44}, "config.data.crop_size=44 (the evaluation crop) is not divisible by the ViT patch size 8"),
    ({"dino.pair_level": "well"}, "config.dino.pair_level='well': use one of ('plate', 'batch')"),
    ({"dino.momentum_teacher": 1.5}, "config.dino.momentum_teacher=1.5: must be a number in [0, 1]"),
    ({"dino.batch_size": 12}, "config.dino.batch_size=12 is not a multiple of the 8 local devices"),
])
def test_dino_views_sizes_and_batch_are_checked_at_config_time(changes, needle):
    found = validation.problems(_dino_study(**changes))
    assert any(needle in p for p in found), found


def test_cross_batch_pairs_need_an_even_number_of_local_views():
    c = _dino_study(**{"dino.views.n_local": 5})
    assert validation.problems(c) == []  # plain DINO: one image gives every view
    c = _dino_study(**{"dino.views.n_local": 5, "methods": ("dino_cb",)})
    assert any("n_local=5 is odd" in p for p in validation.problems(c))


# ----------------------------------------------------------------------------- real data

BAD_JUMP_KEYS = [
    ("data.source", "jumpcp", "use one of ('sim', 'jump', 'jump_profiles')"),
    ("data.jump.root", 3, "must be a string"),
    ("data.jump.load_data", ("a.csv", "a.csv"), "distinct non-empty strings"),
    ("data.jump.sources", ("source_3", ""), "distinct non-empty strings"),
    ("data.jump.compounds", "JCP2022_033924", "tuple (empty: all)"),
    ("data.jump.controls", (), "non-empty tuple"),
    ("data.jump.channels", (), "non-empty tuple"),
    ("data.jump.image_size", -1, "integer >= 0 (0 keeps"),
    ("data.jump.downsample", 0, "integer >= 1"),
    ("data.jump.stats_sample", -5, "integer >= 0 (0 reads every training image)"),
    ("data.jump.num_workers", 0, "integer >= 1"),
    ("data.jump.drop_unlabelled", "yes", "True or False"),
    ("data.jump.upper_percentile", 101.0, "number in (0, 100]"),
    ("data.jump.lower_percentile", 99.995, "below config.data.jump.upper_percentile=99.99"),
    ("data.jump.engine", "spark", "use one of ('local', 'beam')"),
    ("data.jump.on_bad_site", "ignore", "use one of ('raise', 'skip')"),
    ("data.jump.illum", True, "use one of ('auto', 'on', 'off')"),
    ("data.jump.shard_sites", 0, "integer >= 1"),
    ("data.jump.check_headers", "no", "True or False"),
    ("data.jump.progress_every_s", 0, "number > 0"),
    ("data.jump.beam_runner", 1, "must be a string"),
    ("data.jump.beam_options", "--runner=X", "tuple (empty: all)"),
]


@pytest.mark.parametrize("key,value,fix", BAD_JUMP_KEYS)
def test_each_bad_jump_key_is_named_even_for_the_simulator(key, value, fix):
    cfg = _cfg()
    # Bypass ConfigDict's type check, as a config file assigning a new value would not.
    node = cfg
    *path, leaf = key.split(".")
    for p in path:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    found = validation.problems(cfg)
    assert len(found) == 1 and f"config.{key}={value!r}" in found[0] and fix in found[0], found


@pytest.mark.parametrize("key,value,fix", [
    ("tvn.extractor", "clip", "'erm', 'dino', 'file'"),
    ("tvn.embeddings_file", 3, "must be a string"),
    ("tvn.per_unit", 1, "True or False"),
    ("tvn.coral", "yes", "True or False"),
    ("tvn.coral_lam", 0.0, "number > 0"),
    ("tvn.min_variance", 1.0, "number in [0, 1)"),
    ("tvn.head_steps", 0, "integer >= 1"),
    ("tvn.head_lr", -0.1, "number > 0"),
    ("tvn.head_weight_decay", -1e-4, "number >= 0"),
    ("eval.retrieval", "on", "True or False"),
])
def test_tvn_and_retrieval_fields_are_validated(key, value, fix):
    cfg = _cfg()
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    with node.ignore_type():  # a config file may hold any type; the validator must catch it
        node[leaf] = value
    found = validation.problems(cfg)
    assert len(found) == 1 and f"config.{key}={value!r}" in found[0] and fix in found[0], found


def _gallery(tmp_path):
    (tmp_path / "g" / "tables").mkdir(parents=True, exist_ok=True)
    for name in ("load_data.csv", "well.csv.gz", "labels.csv", "plate.csv.gz"):
        (tmp_path / "g" / "tables" / name).write_text("x")
    return {"data.source": "jump", "data.jump.root": str(tmp_path / "g"),
            "data.jump.load_data": ("tables/*.csv",), "data.jump.well_csv": "tables/well.csv.gz",
            "data.jump.labels": "tables/labels.csv"}


def test_a_jump_config_with_existing_tables_is_valid(tmp_path):
    assert _problems(**_gallery(tmp_path)) == []
    # Training sources are checked against the source subset, when one is given.
    found = _problems(**_gallery(tmp_path), **{"data.jump.sources": ("source_8",)})
    assert found == ["config.train_sources=('source_3',): unknown source 'source_3'; use some "
                     "of config.data.jump.sources=('source_8',)"]


@pytest.mark.parametrize("changes,needle", [
    ({"data.jump.root": ""}, "config.data.source='jump' needs config.data.jump.root: set "
                             "--config.data.jump.root="),
    ({"data.jump.root": "/nonexistent/gallery"}, "config.data.jump.root='/nonexistent/gallery' "
                                                 "is not a directory"),
    ({"data.jump.load_data": ()}, "config.data.jump.load_data=(): config.data.source='jump' "
                                  "needs per-plate load_data tables"),
    ({"data.jump.load_data": ("tables/*.parquet",)},
     "config.data.jump.load_data='tables/*.parquet': no such file"),
    ({"data.jump.well_csv": ""}, "config.data.jump.well_csv is empty; config.data.source='jump' "
                                 "needs it (JUMP's well.csv.gz"),
    ({"data.jump.labels": "tables/nope.csv"}, "config.data.jump.labels='tables/nope.csv': no "
                                              "such file"),
    ({"data.jump.plate_types": ("COMPOUND",)}, "config.data.jump.plate_csv is empty"),
    ({"data.jump.labels": "builtin:poscon"}, "no such built-in label table; use one of"),
    ({"model.in_channels": 3}, "config.model.in_channels=3: config.data.jump.channels="),
    ({"data.jump.image_size": 40},
     "config.data.crop_size=48 exceeds config.data.jump.image_size=40"),
])
def test_jump_paths_and_sizes_are_checked_before_anything_is_read(tmp_path, changes, needle):
    found = _problems(**{**_gallery(tmp_path), **changes})
    assert len(found) == 1 and needle in found[0], found


def test_jump_overrides_on_the_command_line_validate(tmp_path):
    config = cli.load_config_file("configs/domain_gap.py")
    argv = ["run.py", "--config=configs/domain_gap.py", "--config.data.source=jump",
            f"--config.data.jump.root={tmp_path}", "--config.data.jump.load_data=('a/*.csv',)",
            "--config.data.jump.plate_types=('COMPOUND',)", "--config.data.jump.stats_sample=64"]
    cli.check_overrides(argv, config)
    bad = ["run.py", "--config.data.jump.rooot=/x"]
    with pytest.raises(ValueError, match="Did you mean data.jump.root"):
        cli.check_overrides(bad, config)


def test_skipping_bad_sites_needs_the_header_scan():
    found = _problems(**{"data.jump.on_bad_site": "skip", "data.jump.check_headers": False})
    assert found == ["config.data.jump.on_bad_site='skip' needs config.data.jump.check_headers="
                     "True: bad files are found by the header scan before any record is written"]
    assert _problems(**{"data.jump.on_bad_site": "skip"}) == []


def test_builtin_label_tables_need_no_file(tmp_path):
    changes = {**_gallery(tmp_path), "data.jump.labels": "builtin:jump_target2"}
    assert _problems(**changes) == []


def test_every_data_jump_key_is_validated():
    for key in defaults.get_defaults().data.jump.keys():
        cfg = _cfg()
        with cfg.data.jump.ignore_type():
            cfg.data.jump[key] = {"not": "valid"}
        found = validation.problems(cfg)
        assert any(f"config.data.jump.{key}=" in p for p in found), (key, found)


def test_tvn_extractor_must_fit_the_model_and_the_file_must_exist(tmp_path):
    found = _problems(**{"methods": ("tvn",), "tvn.extractor": "file"})
    assert len(found) == 1 and "config.tvn.embeddings_file=''" in found[0], found
    emb = tmp_path / "emb.npy"
    emb.write_bytes(b"")
    assert _problems(**{"methods": ("tvn",), "tvn.extractor": "file",
                        "tvn.embeddings_file": str(emb)}) == []
    found = _problems(**{"methods": ("tvn",), "tvn.extractor": "dino"})
    assert len(found) == 1 and "needs a ViT model" in found[0], found
    found = _problems(**{"methods": ("tvn",), "model.name": "vit_cpu"})
    assert any("--config.tvn.extractor=dino" in f for f in found), found
    # Not checked when tvn is not run.
    assert _problems(**{"tvn.extractor": "dino"}) == []
