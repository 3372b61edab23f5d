"""A model in use: loading only what carclf logs, checked (model_check), classifying photos with a registered
or logged model (predict), and registering a sweep's retested models with an alias on the best (promote).

Each name below loads its module on first use, so importing this package stays cheap.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "model_check": ['load_checked_model', 'check_model_dir'],
        "predict": ['load_model'],
        "promote": ['logged_model_uri'],
    },
)
