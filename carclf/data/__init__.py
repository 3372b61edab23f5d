"""The photos, from folders to tensors: the scan of an ImageFolder tree, class selection, leak-free splits
and balancing (prepare), the decode cache, split arrays on disk, the transforms a network's input config
asks for, the batched input path, and the synthetic demo set.

Each name below loads its module on first use, so importing this package stays cheap.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "scan": ['IMAGE_EXTENSIONS', 'ScanResult', 'scan_folder', 'scan_tree'],
        "prepare": [
            'SPLITS', 'BALANCE_MODES', 'select_classes', 'split_items', 'balance', 'class_weights', 'save_manifest',
            'load_manifest', 'manifest_hash', 'ImageDataset', 'PreparedData', 'decode_cache_for', 'prepare_data'
        ],
        "cache": ['DecodeCache', 'decode_image'],
        "arrays": ['array_key', 'load_split'],
        "transforms": ['BatchEval', 'BatchTrainAugment', 'TrainPreset'],
        "inputs": ['DeviceBudget', 'SplitBatches', 'place', 'run_batches'],
        "demo": ['make_demo'],
    },
)
