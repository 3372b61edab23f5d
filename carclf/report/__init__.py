"""The study's answer: retest the best configuration per model on the test split and compare them.

    carclf report quickstart            # results/quickstart/report/report.html and a 'report' MLflow run

For each model family in a sweep, the finished trial with the best validation metric is
picked (never a test figure), retrained with several seeds on the same split (only
`cfg.seed` changes; once when training is deterministic) and evaluated on the untouched test
split. The family's default-configuration trial is retested the same way, and the tuning gain
(best minus default, paired bootstrap interval and McNemar) is said in words. Intervals are percentile
bootstrap intervals over test images, paired across seeds (each resample draws the same
images for every seed; the metric is averaged over seeds). McNemar's exact test compares
the representative runs (the first seed: the trial's own seed, never chosen by a test
figure) of every pair of models on the same test images, Holm-adjusted. The report names a
winner: the family with the best test counterpart of the selection metric (mean over seeds),
with its interval, and whether McNemar's test tells it from the runner-up.

The steps, one module each: `selection` (the sweep's trials, the best per family), `retest`
(seeded retraining on the test split), `compare` (intervals, McNemar, per-class tables),
`gain` (best against default), `render` (figures and the HTML page), `analysis` (the sweep's
importance, history and Pareto front, read from its parent run), `edges` (the sweep's
edge-of-range warnings) and `build` (the whole report, its files, its MLflow run, and
`carclf report`). Their public names are importable from `carclf.report`; each loads its module on first use.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "analysis": ['StoredAnalysis', 'analysis_section', 'load_analysis'],
        "build": [
            'REPORT_FILES', 'SWEEP_PARENT_TAG', 'WINNER_TAG', 'ReportResult', 'build_report', 'cli_report',
            'console_table', 'report_file_name', 'write_outputs'
        ],
        "compare": [
            'TABLE_METRICS', 'comparison_table', 'confused_pairs_table', 'mcnemar_table', 'per_class_f1_table',
            'pooled_confusion', 'ranking_metric', 'split_counts_table', 'winner', 'winner_sentence'
        ],
        "edges": ['EDGE_ARTIFACT', 'edge_lines', 'edge_section', 'edge_table', 'load_edge_warnings'],
        "gain": [
            'DEFAULT_ROLE', 'OVERALL', 'TuningPair', 'default_retests', 'default_trials', 'gain_metrics',
            'gain_section', 'gain_sentence', 'gain_sentences', 'gain_table', 'pair_gain', 'retest_defaults', 'verdict'
        ],
        "render": ['CONFUSION_PREFIX', 'data_uri', 'figure_png', 'render_html', 'report_figures'],
        "retest": [
            'MANIFEST_ARTIFACT', 'REPORT_RUN_TAG', 'REPRESENTATIVE_TAG', 'RETEST_SEEDS_TAG', 'SEED_INDEX_TAG',
            'SOURCE_TRIAL_TAG', 'TEST_HASH_TAG', 'FamilyRetest', 'SeedRun', 'check_same_test_split',
            'deterministic_training', 'manifest_test_hash', 'retest_family', 'retest_trial', 'run_manifest',
            'run_test_hash', 'seed_configs'
        ],
        "selection": [
            'BASELINE_TAG', 'MODEL_TAG', 'NETWORK_KEYS', 'ROLE_TAG', 'STOPPED_TAG', 'SVM_KEYS', 'SWEEP_MODEL_TAG',
            'SWEEP_TAG', 'SweepInfo', 'chosen_configuration', 'configuration_keys', 'family_of', 'final_metric',
            'parent_run', 'resolve_sweep', 'select_best', 'sweep_client', 'sweep_uri', 'trial_config', 'trial_runs',
            'unfinished'
        ],
    },
)
