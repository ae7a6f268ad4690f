"""The metrics chapter's promises: MURA's metrics match values computed by hand, and the bootstrap resamples whole
studies."""
import numpy as np
import pandas as pd

from mura_study.metrics import binary_metrics, bootstrap_ci, bootstrap_weights, metric_table, study_frame


def test_evaluate_metrics_on_a_hand_made_frame_match_hand_computed_values():
    # probabilities are multiples of 1/8, so means and ties are exact
    images = pd.DataFrame(dict(study=['s1', 's1', 's2', 's3', 's4', 's5', 's5'], body_part=['HAND']*4 + ['WRIST']*3,
                               label=[1, 1, 1, 0, 0, 0, 0], prob=[0.875, 0.625, 0.375, 0.625, 0.125, 0.25, 0.5]))
    studies = study_frame(images)
    assert studies.prob.tolist() == [0.75, 0.375, 0.625, 0.125, 0.375]
    t = metric_table(studies, n_boot=300).set_index(['body_part', 'metric']).value
    # studies: s1 TP, s2 FN, s3 FP, s4 and s5 TN -> precision = recall = F1 = 1/2; normal-class F1 2/3; accuracy 3/5
    assert (t['ALL', 'precision'], t['ALL', 'recall'], t['ALL', 'f1']) == (0.5, 0.5, 0.5)
    assert np.isclose(t['ALL', 'macro_f1'], (1/2 + 2/3)/2) and np.isclose(t['ALL', 'accuracy'], 3/5)
    # kappa: p_o = 3/5, p_e = (2/5)(2/5) + (3/5)(3/5) = 13/25 -> (2/25)/(12/25) = 1/6
    assert np.isclose(t['ALL', 'kappa'], 1/6)
    # AUROC, 2 abnormal x 3 normal pairs: 0.75 beats all three; 0.375 beats 0.125, ties 0.375 (1/2), loses to 0.625
    assert t['ALL', 'auroc'] == 4.5/6
    # HAND (s1 TP, s2 FN, s3 FP): p_o = 1/3, p_e = 5/9 -> kappa -1/2; AUROC: 0.75 > 0.625, 0.375 < 0.625 -> 1/2
    assert np.isclose(t['HAND', 'kappa'], -0.5) and t['HAND', 'auroc'] == 0.5
    # WRIST has normal studies only: AUROC and kappa are undefined, precision and recall 0
    # (scikit-learn's zero_division=0)
    assert np.isnan(t['WRIST', 'auroc']) and np.isnan(t['WRIST', 'kappa']) and t['WRIST', 'recall'] == 0
    # images: 0.875 and 0.625 TP, 0.375 FN, 0.625 FP, 0.125 0.25 0.5 TN (0.5 is not > 0.5)
    ti = metric_table(images, n_boot=300).set_index(['body_part', 'metric']).value
    assert np.isclose(ti['ALL', 'recall'], 2/3) and np.isclose(ti['ALL', 'precision'], 2/3)
    assert np.isclose(ti['ALL', 'accuracy'], 5/7)


def test_bootstrap_resamples_whole_studies():
    w = bootstrap_weights(['a', 'a', 'a', 'b', 'c'], n_boot=500, seed=1)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all()
    assert (w[:, [0, 3, 4]].sum(1) == 3).all()  # three studies drawn each time
    m = binary_metrics([1, 1, 1, 0, 0], [0.9, 0.9, 0.9, 0.1, 0.6], w)
    assert m['accuracy'].shape == (500,)


def test_interval_of_a_mean_covers_it_and_ignores_nans():
    mean, lo, hi = bootstrap_ci([0.2, 0.4, 0.6, 0.8, np.nan], n_boot=500, seed=3)
    assert np.isclose(mean, 0.5) and 0.2 <= lo < mean < hi <= 0.8
    assert all(np.isnan(bootstrap_ci([np.nan])))
