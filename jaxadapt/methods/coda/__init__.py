"""Self-supervised online adaptation (Haslum et al., CODA) as pure functions.

DINO (`dino`: loss, centre, EMA teacher, the data-parallel step; `dino_optim`: the
reference's schedules, AdamW and clipping), its pretraining and kNN probe
(`dino_trainer`, `dino_probe`, `knn`), the task models and CODA's dual model
(`task_trainer`), online DINO adaptation per unit (`online`: ODA, CODA), and the MAE
baselines (`mae`, `mae_trainer`, `ttt_mae`). The names below are what research code
composes.
"""

from jaxadapt._faces import lazy_face

_EXPORTS = {
    "DinoSchedules": "jaxadapt.methods.coda.dino_optim",
    "DinoState": "jaxadapt.methods.coda.dino",
    "create_dino_state": "jaxadapt.methods.coda.dino",
    "create_mae_state": "jaxadapt.methods.coda.mae",
    "dino_loss": "jaxadapt.methods.coda.dino",
    "ema_update": "jaxadapt.methods.coda.dino",
    "knn_votes": "jaxadapt.methods.coda.knn",
    "mae_loss": "jaxadapt.methods.coda.mae",
    "make_bank": "jaxadapt.methods.coda.knn",
    "make_dino_optimizer": "jaxadapt.methods.coda.dino_optim",
    "make_dino_schedules": "jaxadapt.methods.coda.dino_optim",
    "make_dino_step": "jaxadapt.methods.coda.dino",
    "make_mae_step": "jaxadapt.methods.coda.mae",
    "make_online_adapter": "jaxadapt.methods.coda.online",
    "make_ttt_adapt": "jaxadapt.methods.coda.ttt_mae",
    "make_ttt_predict": "jaxadapt.methods.coda.ttt_mae",
    "parallel_dino_step": "jaxadapt.methods.coda.dino",
    "update_centre": "jaxadapt.methods.coda.dino",
}
__getattr__, __dir__, __all__ = lazy_face(__name__, _EXPORTS)
