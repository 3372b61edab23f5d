"""The thin core every stage stands on: errors that carry a message for the user, where carclf keeps
things, files written whole or not at all, terminal tables, metrics, statistics, figures, credential
redaction, torch threads. It imports no other part of carclf.

Each name below loads its module on first use, so importing this package stays cheap.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "errors": ['CarclfError', 'ConfigError', 'DataError', 'SweepError', 'TrackingError', 'WeightsError'],
        "paths": ['project_root', 'default_tracking_uri', 'check_sweep_name'],
        "files": [
            'atomic_path', 'atomic_write_bytes', 'check_can_create', 'exclusive_lock', 'file_sha256', 'sha256_bytes',
            'write_error'
        ],
        "console": ['fit_table', 'wrapped'],
        "metrics": ['classification_metrics', 'confusion', 'per_class_report', 'most_confused_pairs'],
        "stats": ['bootstrap_ci', 'bootstrap_diff_ci', 'mcnemar', 'holm'],
        "figures": [
            'class_frequency_figure', 'confusion_figure', 'metric_bars_figure', 'optimization_history_figure',
            'pareto_front_figure', 'save_figure', 'split_counts_figure', 'training_curves_figure'
        ],
        "redact": ['RedactingFormatter', 'redact', 'strip_credentials'],
        "threads": ['machine_threads', 'torch_threads'],
    },
)
