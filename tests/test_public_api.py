"""The public faces research code imports (README, "Using the functions in your own code")."""

import importlib

import pytest

_FACES = {
    "jaxadapt.data": ["DataView", "SiteTable", "load_world", "make_splits", "CHANNELS", "DMSO"],
    "jaxadapt.models": ["resnet18", "vit", "DINOModel", "DINOHead", "BatchNorm", "build_model"],
    "jaxadapt.methods": ["Method", "Trainer", "make_method", "method_names", "trainer_names",
                         "METHODS", "TRAINERS"],
    "jaxadapt.methods.bn": ["context_stats", "apply_with_stats", "plate_stats", "PlatePredictor",
                            "episode_loss", "tent_adapter"],
    "jaxadapt.methods.coda": ["make_dino_step", "parallel_dino_step", "create_dino_state",
                              "make_dino_schedules", "make_dino_optimizer", "make_ttt_predict",
                              "make_online_adapter"],
    "jaxadapt.methods.tvn": ["fit_tvn", "apply_tvn", "coral"],
    "jaxadapt.train": ["fit", "FitConfig", "TrainState", "make_data_mesh", "replicate",
                       "shard_batch", "Checkpointer"],
    "jaxadapt.eval": ["run_study", "plan_study", "validate", "ConfigError", "accuracy"],
}


@pytest.mark.parametrize("module", sorted(_FACES))
def test_each_face_exports_what_research_code_uses(module):
    face = importlib.import_module(module)
    missing = [n for n in _FACES[module] if not hasattr(face, n)]
    assert not missing, f"{module} lacks {missing}"
    assert set(face.__all__) >= set(_FACES[module]), "each face lists its names in __all__"
    for name in getattr(face, "__all__", ()):
        assert hasattr(face, name), f"{module}.__all__ names {name!r}, which it lacks"


def test_faces_are_lazy_so_pure_modules_import_with_jax_and_flax_alone():
    """A machine with only jax/flax/optax (a lent accelerator) imports the pure functions."""
    import subprocess
    import sys
    code = ("import sys\n"
            "for m in ('grain', 'tensorflow_datasets', 'array_record', 'pandas'):\n"
            "    sys.modules[m] = None  # importing any of them now fails\n"
            "import jaxadapt.data.sim.simulator, jaxadapt.methods.coda.dino\n"
            "import jaxadapt.methods.bn.stats, jaxadapt.models.vit, jaxadapt.train.parallel\n"
            "from jaxadapt.methods.bn import context_stats\n"
            "from jaxadapt.methods.coda import make_dino_step\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_face_names_a_missing_attribute():
    import jaxadapt.methods.bn as bn
    with pytest.raises(AttributeError, match="'jaxadapt.methods.bn' has no attribute 'nope'"):
        bn.nope  # noqa: B018
