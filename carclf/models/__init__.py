"""What carclf can build, by name: the registry of built-in networks and the SVM head (and
`register_model` for more), the torchvision and timm zoos, weights and their sha256, the fine-tuning
modes a network supports, and `carclf models`.

    model = build_model("mobilenet_v2", num_classes=10, weights="imagenet", finetune="head")
    backbone = build_backbone("timm/convnext_tiny.fb_in22k_ft_in1k", features="gap")
    svm = build_model("svm", num_classes=10, kernel="rbf", C=10.0, gamma="scale")

Each name below loads its module on first use, so importing this package stays cheap.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "records": [
            'IMAGENET_MEAN', 'IMAGENET_STD', 'FEATURE_MODES', 'FINETUNE_MODES', 'InputConfig', 'Architecture',
            'ModelSpec'
        ],
        "registry": [
            'MODELS', 'register_model', 'list_models', 'check_model_name', 'is_network', 'min_image_size',
            'image_size_problem', 'vgg16', 'alexnet', 'resnet18', 'mobilenet_v2', 'efficientnet_b0', 'simple_cnn',
            'svm'
        ],
        "networks": [
            'build_model', 'build_backbone', 'Backbone', 'finetune_applies', 'count_parameters', 'model_size_mb'
        ],
        "svm": ['SVM_CALIBRATION_FOLDS', 'calibration_folds', 'svm_pipeline', 'fit_svm'],
        "weights": ['resolve_weights', 'weights_sha256'],
        "zoo": ['parse_name', 'architecture', 'preprocessing', 'mobilenet_v2_weights_file'],
        "finetune": ['find_blocks', 'block_count', 'probe_problem', 'top_problem'],
        "catalog": ['listing', 'offline_weights'],
    },
)
