"""Why a sweep found what it found: per family, hyperparameter importance, optimisation history, parallel
coordinates and the Pareto front (explain), and the edge-of-range warnings (edges).

Each name below loads its module on first use, so importing this package stays cheap.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "explain": ['analyze_finished_sweep'],
        "edges": ['edge_warnings', 'edge_lines'],
    },
)
