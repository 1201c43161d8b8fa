"""Tests of jaxadapt.methods.registry, the recipes and the checkpoint key they define."""

import hashlib
import json

import ml_collections
import pytest

from jaxadapt import config as defaults
from jaxadapt.data import worlds
from jaxadapt.eval import protocol
from jaxadapt.methods import registry
from jaxadapt.methods.base import Method


def _old_training_key(cfg, trainer):
    """The key as protocol.py computed it before the registry (hand-listed fields)."""
    ignored = {"erm": ("arm",), "arm_bn": ("arm.n_controls", "arm.on_missing_controls")}
    spec = {k: cfg[k].to_dict() for k in ("data", "splits", "model", "train", "arm") if k in cfg}
    for path in ("data.num_threads", "data.cache_dir") + ignored.get(trainer, ()):
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return f"{trainer}-{digest[:12]}"


@pytest.fixture
def toy_registry(monkeypatch):
    """A registry copy with a `toy` recipe that reads its own `toy` section."""
    monkeypatch.setattr(registry, "TRAINERS", dict(registry.TRAINERS))
    registry.register_trainer(registry.Trainer("toy", ("train", "toy"), lambda m, c: "built",
                                       ignored=("toy.log_every",)))


def _toy_cfg():
    cfg = defaults.get_defaults()
    cfg.toy = ml_collections.ConfigDict({"momentum": 0.996, "log_every": 10})
    return cfg


def test_bn_family_is_registered():
    assert {"erm", "arm_bn", "cs_arm_bn", "ben"} <= set(registry.trainer_names())


@pytest.mark.parametrize("trainer", ["erm", "arm_bn", "cs_arm_bn", "ben"])
def test_existing_checkpoint_keys_are_unchanged(trainer):
    a = defaults.get_defaults()
    assert protocol.training_key(a, trainer) == _old_training_key(_before_profiles(a), trainer)
    a.arm.n_controls, a.model.width, a.data.num_threads = 128, 8, 5
    assert protocol.training_key(a, trainer) == _old_training_key(_before_profiles(a), trainer)


def _before_profiles(cfg):
    """The config as it was before data.source / data.jump / data.profiles / mlp_hidden_layers
    and the pretrained-import fields (model.init*)."""
    plain = cfg.to_dict()
    plain["data"] = {k: v for k, v in plain["data"].items()
                     if k not in ("source", "profiles", "jump")}
    plain["model"] = {k: v for k, v in plain["model"].items()
                      if k != "mlp_hidden_layers" and not k.startswith("init")}
    return ml_collections.ConfigDict(plain)


def test_profile_keys_enter_only_profile_studies_training_keys():
    """Simulator studies keep the checkpoint keys they had before data.source/profiles existed."""
    a, b = defaults.get_defaults(), defaults.get_defaults()
    b.data.profiles.normalization = "standardize"
    assert protocol.training_key(b, "erm") == protocol.training_key(a, "erm")
    a.data.source = b.data.source = "jump_profiles"
    a.model.name = b.model.name = "mlp"
    assert protocol.training_key(b, "erm") != protocol.training_key(a, "erm")


@pytest.mark.parametrize("source", ["sim", "jump", "jump_profiles"])
def test_unused_data_keys_are_the_data_sources_own_inert_keys(source):
    cfg = defaults.get_defaults()
    cfg.data.source = source
    init = ("model.init", "model.init_channel_rule", "model.init_select_channels")
    assert registry.unused_data_keys(cfg) == (worlds.inert_keys(cfg) + ("model.mlp_hidden_layers",)
                                              + init)
    assert worlds.inert_keys(cfg) == worlds.INERT_KEYS[source]
    cfg.model.name = "mlp"
    assert registry.unused_data_keys(cfg) == worlds.INERT_KEYS[source] + init
    # A data source reads neither of the others' sections.
    others = {"sim": "data.sim", "jump": "data.jump", "jump_profiles": "data.profiles"}
    assert {v for k, v in others.items() if k != source} <= set(worlds.INERT_KEYS[source])


def test_unknown_trainer_names_the_known_ones():
    with pytest.raises(ValueError, match=r"'dinoo'.*known trainers: \[.*'cs_arm_bn'.*'erm'"):
        registry.get("dinoo")
    with pytest.raises(ValueError, match=r"\['dinoo'\].*known trainers"):
        registry.build_trainers(None, defaults.get_defaults(), {"erm", "dinoo"})
    with pytest.raises(ValueError, match="known trainers"):
        protocol.training_key(defaults.get_defaults(), "dinoo")


def test_register_rejects_a_taken_name_and_common_sections(toy_registry):
    with pytest.raises(ValueError, match="'erm' is already registered"):
        registry.register_trainer(registry.Trainer("erm", ("train",), lambda m, c: None))
    with pytest.raises(ValueError, match=r"\['model'\] are common"):
        registry.register_trainer(registry.Trainer("x", ("model",), lambda m, c: None))


def test_new_trainer_section_enters_only_its_own_key(toy_registry):
    a, b = _toy_cfg(), _toy_cfg()
    b.toy.momentum = 0.99
    assert protocol.training_key(a, "toy") != protocol.training_key(b, "toy")
    # Other recipes do not read the toy section: their checkpoints stay valid.
    for other in ("erm", "cs_arm_bn"):
        assert protocol.training_key(a, other) == protocol.training_key(b, other)
    c = _toy_cfg()
    c.arm.n_perturbed = 3  # a section toy does not declare
    c.toy.log_every = 99  # a field it declares ignored
    c.data.num_threads = 1  # speed only
    assert protocol.training_key(a, "toy") == protocol.training_key(c, "toy")
    c.model.width = 8  # common: every recipe
    assert protocol.training_key(a, "toy") != protocol.training_key(c, "toy")


def test_trainer_spec_drops_overrides_the_recipe_never_reads(toy_registry):
    cfg = _toy_cfg()
    method = Method("m", "toy", lambda v, u: None,
                    train_overrides=(("arm.n_controls", 3), ("toy.log_every", 1),
                                     ("toy.momentum", 0.5)))
    want = protocol.TrainerSpec("toy", (("toy.momentum", 0.5),))
    assert protocol.trainer_spec(method, cfg) == want
    erm = Method("e", "erm", lambda v, u: None, train_overrides=(("arm.n_controls", 3),))
    assert protocol.trainer_spec(erm, cfg) == protocol.TrainerSpec("erm")


def test_reads():
    erm, arm = registry.get("erm"), registry.get("arm_bn")
    assert erm.reads("train.batch_size") and erm.reads("model.width")
    assert not erm.reads("arm.n_controls") and not erm.reads("data.num_threads")
    assert arm.reads("arm.n_perturbed") and not arm.reads("arm.n_controls")


_ALL_METHODS = ["adabn", "adabn_plate", "arm_bn", "ben", "coda", "cs_arm_bn", "cs_arm_bn_plate",
                "dino", "dino_cb", "dual_cb", "dual_dino", "dual_mae", "erm", "oda", "oda_mae",
                "random_init", "supervised", "tent", "ttt_mae", "tvn"]
_ALL_TRAINERS = ["arm_bn", "ben", "cs_arm_bn", "dino", "dino_cb", "dual_cb", "dual_dino",
                 "dual_mae", "erm", "random_init", "supervised", "tvn"]


def test_a_fresh_interpreter_importing_the_registry_alone_knows_every_method_and_recipe():
    """No method registers itself as a side effect of importing some other module."""
    import subprocess
    import sys
    code = ("import json, sys; from jaxadapt.methods import registry as r; "
            "loaded = sorted(m for m in sys.modules if m.startswith('jaxadapt.')); "
            "from jaxadapt.config import get_defaults; c = get_defaults(); "
            "print(json.dumps([r.method_names(), r.trainer_names(), "
            "{n: r.make_method(n, None, c).trainer for n in r.method_names()}, loaded]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    methods, trainers, recipe_of, loaded = json.loads(out.stdout)
    assert methods == _ALL_METHODS
    assert trainers == _ALL_TRAINERS
    assert set(recipe_of.values()) <= set(trainers)  # every method's recipe is in the table
    assert recipe_of["coda"] == "dual_cb" and recipe_of["tvn"] == "tvn"
    assert not [m for m in loaded if m.startswith("jaxadapt.eval")]  # the runner is not needed


def test_register_method_adds_one_for_research_code_and_rejects_a_taken_name(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    registry.register_method("mine", lambda model, cfg, setting: Method("mine", "erm",
                                                                        lambda v, u: None))
    assert registry.make_method("mine", None, None).name == "mine"
    with pytest.raises(ValueError, match="'erm' is already registered"):
        registry.register_method("erm", lambda model, cfg, setting: None)
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available: \[.*'tvn'"):
        registry.make_method("nope", None, None)


def test_a_pretrained_init_enters_the_training_key_and_random_init_keeps_the_old_one():
    a = defaults.get_defaults()
    b = defaults.get_defaults()
    b.model.init_channel_rule = "select"  # ignored while init is random
    assert registry.checkpoint_key(a, "dino") == registry.checkpoint_key(b, "dino")
    b.model.init = "/weights/deit_small_patch16_224.pth"
    assert registry.checkpoint_key(a, "dino") != registry.checkpoint_key(b, "dino")
