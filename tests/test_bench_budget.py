"""CPU tests of benchmarks/budget.py: each configuration's time limit is cut to what is left of
the invocation's budget, and none is started with too little left.
"""

from benchmarks.budget import BUDGET_MARGIN_S, MIN_CONFIG_S, Budget


def test_budget_cuts_each_configuration_to_what_is_left():
    now = [0.0]
    budget = Budget(300.0, 520.0, clock=lambda: now[0])
    assert budget.config_timeout() == 300.0
    now[0] = 200.0
    assert budget.config_timeout() == 520.0 - 200.0 - BUDGET_MARGIN_S
    now[0] = 520.0 - BUDGET_MARGIN_S - MIN_CONFIG_S + 1
    assert budget.config_timeout() is None
    assert Budget(300.0).config_timeout() == 300.0
