"""The generic comparison's budget fitting (`eqkernels.pipelines.compare.fit_to_budget`), on cost models simple
enough to follow by hand: the expected sizes below are worked out step by step in the docstrings."""
from eqkernels.pipelines.compare import fit_to_budget
from eqkernels.pipelines.histology_compare import ADAPTER as HISTOLOGY, CompareConfig
from eqkernels.pipelines.molecules_compare import ADAPTER as MOLECULES, MoleculeCompareConfig


def test_members_of_every_pool_shrink_together_until_the_estimate_fits():
    """1 s per member of either pool and per width; budget 20 s, so the plan must fit 18 s.

    20 + 10 members + 4 widths = 34 s: factor 18/34 → 10 and 5 members (19 s, still over); then the
    factor is capped at 0.9 → 9 and 4 members (17 s), which fits; the widths are untouched.
    """
    config = CompareConfig(members=20, gcnn_members=10, widths=(16, 32, 64, 128))
    fitted, note = fit_to_budget(HISTOLOGY, config, lambda c: {"pools": c.members + c.gcnn_members,
                                                               "width study": len(c.widths)}, 20.0)
    assert (fitted.members, fitted.gcnn_members, fitted.widths) == (9, 4, (16, 32, 64, 128))
    assert note == ("estimated 17 s of a 20 s budget after fitting: members per ensemble reduced from 20 (CNN) / 10 "
                    "(GCNN) to 9 / 4")


def test_widest_widths_go_once_members_are_at_their_minimum():
    """Members cost 1 s, each width 10 s; budget 30 s (27 s to fit).

    8 members + 4 widths = 48 s → factor 27/48 → 4 members (44 s) → factor 0.61 → 2 members (42 s); no
    member can go, so the widest widths do: 3 widths (32 s), 2 widths (22 s) fits.
    """
    config = MoleculeCompareConfig(members=8, widths=(32, 64, 128, 256))
    fitted, note = fit_to_budget(MOLECULES, config, lambda c: c.members + 10 * len(c.widths), 30.0)
    assert (fitted.members, fitted.widths) == (2, (32, 64))
    assert note == ("estimated 22 s for the ensembles after fitting: members per ensemble reduced from 8 to 2; "
                    "width study limited to widths [32, 64]")


def test_a_plan_that_cannot_fit_says_so_and_one_that_fits_is_kept():
    config = MoleculeCompareConfig(members=2, widths=(32, 64))
    fitted, note = fit_to_budget(MOLECULES, config, lambda c: 100.0, 30.0)
    assert fitted == config and "(still over: the smallest plan)" in note
    fitted, note = fit_to_budget(MOLECULES, config, lambda c: 10.0, 30.0)
    assert fitted == config
    assert note == "estimated 10 s for the ensembles of a 30 s remaining budget: sizes as configured"
