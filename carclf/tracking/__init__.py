"""MLflow, as carclf uses it: the tracking URI and its checks, experiments, runs, and logging configs,
figures, tables and models (runs); the local tracking server in front of a sqlite store (server); what
runs look like in the MLflow UI (browse).

Each name below loads its module on first use, so importing this package stays cheap.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "runs": [
            'resolve_tracking_uri', 'ensure_experiment', 'start_run', 'log_params', 'log_config', 'log_metrics',
            'log_figure', 'log_json', 'log_artifact', 'log_dataframe', 'log_network_model', 'log_svm_model'
        ],
        "server": ['TrackingServer'],
        "browse": ['mark_experiment', 'save_sweep_view', 'ui_url'],
    },
)
