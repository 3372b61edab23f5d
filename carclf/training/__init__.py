"""Fitting the models: the epoch loop with early stopping, CNN features cached for the SVMs, the probe
(a head on a frozen backbone's cached features), top fine-tuning (the last blocks on a frozen trunk's cached
activations), inference timing, LogME and the backbone ranking built on it, features fetched ahead of runs.

Each name below loads its module on first use, so importing this package stays cheap.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "loop": [
            'SELECTION_METRIC', 'EpochCallback', 'EvalOutput', 'FitResult', 'Outcome', 'check_device',
            'select_device', 'seed_everything', 'make_optimizer', 'make_loader', 'train_one_epoch', 'evaluate',
            'predict_probs', 'fit'
        ],
        "features": ['FeatureCache', 'FeatureSet', 'build_feature_backbone', 'split_features'],
        "probe": ['run_probe'],
        "top": ['run_top'],
        "timing": ['seconds_per_image', 'infer_seconds'],
        "logme": ['logme'],
        "rank": ['rank_backbones'],
        "prefetch": ['prefetch_features'],
    },
)
