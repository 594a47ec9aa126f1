import numpy as np
import pytest

from eqkernels.groups import GROUPS, get_group


@pytest.mark.parametrize("name", list(GROUPS))
def test_table_matches_the_action(name, rng):
    group = get_group(name)
    x = rng.standard_normal((7, 7, 2))
    for i, g in enumerate(group.elements):
        for j, h in enumerate(group.elements):
            composed = group.act(group.act(x, h), g)
            assert np.array_equal(composed, group.act(x, int(group.multiplication_table[i, j])))
        assert np.array_equal(group.act(group.act(x, g), int(group.inverse[i])), x)


def test_orders_and_closure():
    assert [get_group(n).order for n in ("C1", "C2", "C4", "D1", "D2", "D4")] == [1, 2, 4, 2, 4, 8]
    d4 = get_group("D4")
    # D4 is not abelian: some pair of elements does not commute.
    table = d4.multiplication_table
    assert np.any(table != table.T)
    assert np.all(np.sort(table, axis=1) == np.arange(8))  # Latin square: every product is an element


def test_rotation_is_counter_clockwise_quarter_turn():
    x = np.arange(4).reshape(2, 2, 1)
    rotated = get_group("C4").act(x, 1)[..., 0]
    assert rotated.tolist() == [[1, 3], [0, 2]]


def test_unknown_group_and_non_square():
    with pytest.raises(ValueError, match="unknown group"):
        get_group("C7")
    with pytest.raises(ValueError, match="square"):
        get_group("C4").act(np.zeros((3, 4, 1)), 1)
