"""A study config small enough for an end-to-end test on 2 CPU cores."""

from jaxadapt import config as defaults


def tiny_config(cache_dir: str, **changes):
    """Two sources x 4 batches x 1 plate, 1 site per well, 32 px, width-4 ResNet-18."""
    c = defaults.get_defaults()
    c.study = "tiny"
    c.seeds = (0,)
    c.data.cache_dir = cache_dir
    c.data.sim.batches_per_source = 4
    c.data.sim.plates_per_batch = 1
    c.data.sim.sites_per_well = 1
    c.data.sim.image_size = 40
    c.data.crop_size = 32
    c.model.width = 4
    c.train.batch_size = 16
    c.train.eval_batch_size = 16
    c.train.num_epochs = 2
    c.train.patience = 2
    c.eval.batch_size = 16
    return set_keys(c, changes)


def set_keys(c, changes):
    """Sets dotted keys of config `c` ({"train.batch_size": 8, ...}); returns `c`."""
    for key, value in changes.items():
        target = c
        *path, leaf = key.split(".")
        for p in path:
            target = target[p]
        target[leaf] = value
    return c
