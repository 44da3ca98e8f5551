"""Time limits of a benchmark invocation: every configuration gets --timeout seconds, cut to what
is left of an optional --budget for the whole invocation (minus a margin for stopping the running
configuration and writing the results), and the drivers' loop runs the configurations under them.
"""

import time

# A budget (--budget) keeps this much for stopping the running configuration's process group
# (SIGTERM, up to 30 s grace) and writing the results; a configuration is not started with less
# than MIN_CONFIG_S of it left.
BUDGET_MARGIN_S = 45.0
MIN_CONFIG_S = 60.0


class Budget:
    """Per-configuration time limits under an optional budget for the whole invocation."""

    def __init__(self, per_config, total=None, clock=time.monotonic):
        self.per_config = per_config
        self.clock = clock
        self.deadline = None if total is None else clock() + total

    def config_timeout(self):
        """Seconds the next configuration may run, or None if too little budget is left."""
        if self.deadline is None:
            return self.per_config
        left = self.deadline - self.clock() - BUDGET_MARGIN_S
        if left < MIN_CONFIG_S:
            return None
        return min(self.per_config, left)


def run_configurations(configs, budget, run_one, markdown, plot, json_path, logs_dir):
    """The drivers' loop: run_one(config, timeout) -> (record, results doc so far) for every
    configuration the budget still allows, then the markdown report printed and the PNG drawn.
    Returns the exit status: 0 all ok, 1 any failed or not started, 130 interrupted."""
    failed, doc = [], None
    for config in configs:
        timeout = budget.config_timeout()
        if timeout is None:
            print(f"== {config}: not started, the --budget is spent", flush=True)
            failed.append(config)
            continue
        record, doc = run_one(config, timeout)
        if record["status"] != "ok":
            failed.append(config)
        if record["status"] == "interrupted":
            print(f"interrupted; results so far: {json_path}", flush=True)
            return 130
    if doc is None:
        return 1
    print(markdown(doc))
    plot(doc, json_path.with_suffix(".png"))
    print(f"results: {json_path} (.md, .png); logs: {logs_dir}")
    return 1 if failed else 0
