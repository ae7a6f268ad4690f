"""The metrics chapter's promises: MURA's metrics match values computed by hand, and the bootstrap resamples whole
studies."""
import numpy as np
import pandas as pd

from mura_study.metrics import (best_threshold, binary_metrics, bootstrap_ci, bootstrap_weights, compare_models,
                                leak_bootstrap, metric_table, operating_point, paired_bootstrap, study_frame)


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


def _studies(prob, label, prefix='s'):
    return pd.DataFrame(dict(study=[f'{prefix}{i}' for i in range(len(prob))], label=label, prob=prob))


def test_paired_comparison_of_a_hand_made_pair_of_models():
    # ten studies, five abnormal; A is right on all, B misses one abnormal study: F1 1 and 2*4/(2*4 + 1) = 8/9
    label = [1]*5 + [0]*5
    a = _studies([0.9]*5 + [0.1]*5, label)
    b = _studies([0.9]*4 + [0.2] + [0.1]*5, label)
    rows = compare_models({'A': a, 'B': b}, ('f1',), ref='best', n_boot=400).set_index('model')
    assert rows.ref.unique().tolist() == ['A'] and np.isclose(rows.value['B'], 8/9)
    assert np.isclose(rows['diff']['B'], 8/9 - 1)
    assert rows.diff_hi['B'] <= 0 and rows.p_diff_le_0['B'] == 1.0  # B is never better than a perfect A
    assert (rows['diff']['A'], rows.diff_lo['A'], rows.diff_hi['A']) == (0, 0, 0)
    # two "seeds" of B, one of them as good as A: their mean and their spread
    two = compare_models({'A': a, 'B': [b, a]}, ('f1',), ref='A', n_boot=50).set_index('model')
    assert np.isclose(two.value['B'], (8/9 + 1)/2) and np.isclose(two.seed_sd['B'], (1/9)/np.sqrt(2))
    gain = paired_bootstrap(a, b, metrics=('f1',), n_boot=400).iloc[0]  # the two-model form: the same numbers
    assert np.isclose(gain.gain, 8/9 - 1) and gain.p_no_gain == 1.0 and np.isclose(gain.gain_hi, rows.diff_hi['B'])


def test_leak_bootstrap_sees_a_hand_made_leak_and_none_on_the_shared_set_itself():
    label = [1]*10 + [0]*10
    shared = _studies([0.7]*7 + [0.3]*3 + [0.3]*7 + [0.7]*3, label)  # 7 of 10 right in each class
    own_leaky = _studies([0.9]*10 + [0.1]*10, label, 'l')  # perfect on its own test split
    t = leak_bootstrap({'paper': own_leaky, 'paper_clean': shared.assign(study=lambda d: 'c' + d.study),
                        'official': shared}, {p: shared for p in ('paper', 'paper_clean', 'official')},
                       metrics=('f1',), n_boot=400).set_index('protocol')
    assert np.isclose(t.inflation['paper'], 1 - 0.7) and t.inflation_lo['paper'] > 0
    assert np.isclose(t.inflation['paper_clean'], 0) and np.isclose(t.vs_ref['paper'], 0.3)
    assert (t.inflation['official'], t.inflation_lo['official'], t.inflation_hi['official']) == (0, 0, 0)


def test_the_operating_point_is_chosen_on_validation_only():
    valid = _studies([0.45, 0.4, 0.9, 0.3, 0.2], [1, 1, 1, 0, 0])
    test = _studies([0.42, 0.6, 0.1, 0.38], [1, 1, 0, 0])
    op = operating_point(valid, test, n_boot=100)
    assert op['threshold'] == best_threshold(valid.label, valid.prob) == 0.35
    assert op['test_f1_05'] == binary_metrics(test.label, test.prob)['f1'][0]  # 0.6 alone is abnormal: 2/3
    assert op['test_f1_t'] == binary_metrics(test.label, test.prob, threshold=0.35)['f1'][0]  # 0.38 flagged: 4/5
    shuffled = operating_point(valid, test.assign(label=[0, 0, 1, 1]), n_boot=100)
    assert shuffled['threshold'] == op['threshold']  # the test labels play no part in the choice
