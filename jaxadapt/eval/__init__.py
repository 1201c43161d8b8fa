"""Studies: validate a config, plan it, train and score every method, write the tables.

`study` (`run_study`, `plan_study`, `load_replicate`), `protocol` (the one runner every
method plugs into), `validation` (every problem of a config, before anything runs),
`metrics`, `retrieval` (copairs mAP), `reports` (tables and plots), `diagnostics`.
"""

from jaxadapt.eval.metrics import accuracy, confusion_matrix, macro_f1
from jaxadapt.eval.reports import aggregate, markdown_table
from jaxadapt.eval.study import StudyPlan, load_replicate, plan_study, run_study
from jaxadapt.eval.validation import ConfigError, problems, validate

__all__ = ["ConfigError", "StudyPlan", "accuracy", "aggregate", "confusion_matrix",
           "load_replicate", "macro_f1", "markdown_table", "plan_study", "problems", "run_study",
           "validate"]
