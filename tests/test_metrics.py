"""IES / RCS (FMDConv paper, Sec. 3.2, Eqs. 3-4) against the values its Tables 3-7 print (exact to 2 decimals)."""
import pytest

from dynzoo.utils.metrics import N_CIFAR, N_IMAGENET, ies, rcs

# (time per epoch s, top-1 %, expected IES, expected RCS, N) -- values printed by the paper
VECTORS = [
    (114.7, 94.21, 121.75, 492.82, N_CIFAR),       # Table 3, Ours
    (222.1, 72.63, 305.80, 196.21, N_CIFAR),       # Table 4, ODConv (paper prints 305.79: rounding)
    (620.34, 73.21, 847.34, 1511.98, N_IMAGENET),  # Table 5, Ours
    (1780.35, 78.32, 2273.17, 563.60, N_IMAGENET),  # Table 6, ODConv
    (87.37, 70.23, 124.41, 10298.31, N_IMAGENET),  # Table 7, Ours
]


def test_dataset_constants():
    assert N_CIFAR == 60_000
    assert N_IMAGENET == 1_281_167


@pytest.mark.parametrize('time_s, top1, exp_ies, exp_rcs, n', VECTORS)
def test_paper_vectors(time_s, top1, exp_ies, exp_rcs, n):
    assert round(ies(time_s, top1), 2) == pytest.approx(exp_ies, abs=1e-9)
    assert round(rcs(time_s, top1, n), 2) == pytest.approx(exp_rcs, abs=1e-9)


@pytest.mark.parametrize('time_s, top1, _ies, _rcs, n', VECTORS)
def test_rcs_is_n_over_ies(time_s, top1, _ies, _rcs, n):
    assert rcs(time_s, top1, n) == pytest.approx(n / ies(time_s, top1), rel=1e-12)


def test_static_row_of_table2():
    # Table 2 prints no IES/RCS for the static baseline (89.7 %, 47.01 s); Eqs. 3-4 give IES 52.41 and RCS 1144.86
    assert round(ies(47.01, 89.7), 2) == 52.41
    assert round(rcs(47.01, 89.7, N_CIFAR), 2) == 1144.86


@pytest.mark.parametrize('args', [(0.0, 50.0), (-1.0, 50.0), (10.0, 0.0), (10.0, 101.0)])
def test_bad_inputs_raise(args):
    with pytest.raises(ValueError):
        ies(*args)
    with pytest.raises(ValueError):
        rcs(*args, N_CIFAR)


def test_bad_num_images_raises():
    with pytest.raises(ValueError, match='num_images'):
        rcs(10.0, 50.0, 0)
