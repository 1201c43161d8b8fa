"""Self-supervised online adaptation (Haslum et al., CODA) as pure functions.

DINO (`dino`: loss, centre, EMA teacher, the data-parallel step; `dino_optim`: the
reference's schedules, AdamW and clipping), its pretraining and kNN probe
(`dino_trainer`, `dino_probe`, `knn`), the task models and CODA's dual model
(`task_trainer`), online DINO adaptation per unit (`online`: ODA, CODA), and the MAE
baselines (`mae`, `mae_trainer`, `ttt_mae`). The names below are what research code
composes.
"""

from jaxadapt.methods.coda.dino import (DinoState, create_dino_state, dino_loss, ema_update,
                                        make_dino_step, parallel_dino_step, update_centre)
from jaxadapt.methods.coda.dino_optim import (DinoSchedules, make_dino_optimizer,
                                              make_dino_schedules)
from jaxadapt.methods.coda.knn import knn_votes, make_bank
from jaxadapt.methods.coda.mae import create_mae_state, mae_loss, make_mae_step
from jaxadapt.methods.coda.online import make_online_adapter
from jaxadapt.methods.coda.ttt_mae import make_ttt_adapt, make_ttt_predict

__all__ = ["DinoSchedules", "DinoState", "create_dino_state", "create_mae_state", "dino_loss",
           "ema_update", "knn_votes", "mae_loss", "make_bank", "make_dino_optimizer",
           "make_dino_schedules", "make_dino_step", "make_mae_step", "make_online_adapter",
           "make_ttt_adapt", "make_ttt_predict", "parallel_dino_step", "update_centre"]
