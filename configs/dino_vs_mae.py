"""Study 6: DINO vs MAE as the objective of online adaptation (CODA: ODA-DINO beats ODA-MAE).

    python experiments/run.py --config configs/dino_vs_mae.py
    python experiments/run.py --config configs/dino_vs_mae.py:gpu

Same world as `configs/coda_matrix.py` (trained on source_3, scored on the other main
sources, adapted per batch). Two extractors with the same task transformer on top:
  dual_dino / oda       a DINO-pretrained ViT, frozen / adapted on each target batch with DINO;
  dual_mae / oda_mae    an MAE-pretrained ViT (`config.mae`), frozen / adapted on each target
                        batch with the MAE objective (decoder frozen), with ODA's budget
                        (`config.coda.adapt`: epochs, batch size, learning rate).
"""

import pathlib

from jaxadapt.data import splits
from jaxadapt.data.sim import target2
from jaxadapt.eval import cli


def get_config(variant: str = "cpu"):
    """Args: variant, "cpu" or "gpu". Returns: the ConfigDict."""
    # The same world and models as study 4 (configs are loaded by path, as the runner does).
    c = cli.load_config_file(f"{pathlib.Path(__file__).with_name('coda_matrix.py')}:{variant}")
    c.study = "dino_vs_mae"
    c.methods = ("dual_dino", "oda", "dual_mae", "oda_mae")
    targets = tuple(s for s in target2.MAIN_SOURCES if s not in c.train_sources)
    c.eval_splits = splits.source_matrix(c.train_sources, targets)
    if variant == "gpu":
        c.mae.size, c.mae.epochs, c.mae.batch_size, c.mae.warmup_epochs = "mae_small", 300, 256, 40
    return c
