"""The checkpoint format's own helpers."""

from vitlab.runs.checkpoint import put_nested


def test_put_nested_makes_dicts_and_lists_on_the_way_and_keeps_what_is_there() -> None:
    state = {"optim": {"param_groups": [{"lr": 0.1}]}}
    put_nested(state, ("optim", "param_groups", 0, "betas"), (0.9, 0.95))
    put_nested(state, ("optim", "param_groups", 2, "lr"), 0.2)
    put_nested(state, ("model", "step"), 7)
    assert state == {
        "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}, None, {"lr": 0.2}]},
        "model": {"step": 7},
    }
