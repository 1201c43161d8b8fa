"""Studies: validate a config, plan it, train and score every method, write the tables.

`study` (`run_study`, `plan_study`, `load_replicate`), `protocol` (the one runner every
method plugs into), `validation` (every problem of a config, before anything runs),
`metrics`, `retrieval` (copairs mAP), `reports` (tables and plots), `diagnostics`.
"""

from jaxadapt._faces import lazy_face

_EXPORTS = {
    "ConfigError": "jaxadapt.eval.validation",
    "StudyPlan": "jaxadapt.eval.study",
    "accuracy": "jaxadapt.eval.metrics",
    "aggregate": "jaxadapt.eval.reports",
    "confusion_matrix": "jaxadapt.eval.metrics",
    "load_replicate": "jaxadapt.eval.study",
    "macro_f1": "jaxadapt.eval.metrics",
    "markdown_table": "jaxadapt.eval.reports",
    "plan_study": "jaxadapt.eval.study",
    "problems": "jaxadapt.eval.validation",
    "run_study": "jaxadapt.eval.study",
    "validate": "jaxadapt.eval.validation",
}
__getattr__, __dir__, __all__ = lazy_face(__name__, _EXPORTS)
