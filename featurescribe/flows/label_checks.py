"""The checks a label run's options get before any work: each failure is one line for the user."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from featurescribe.errors import BadOption
from featurescribe.options import check_seed

if TYPE_CHECKING:
    from featurescribe.flows.label_options import LabelOptions


def check_options(o: "LabelOptions") -> None:
    """BadOption for options no run can work with (nothing is opened or loaded)."""
    from featurescribe.flows.label_options import (BATCH_RETRIES, METHOD_CHOICES, RUNNERS, parse_baseline,
                                                    parse_gate, parse_window_counts)
    from featurescribe.labelers import check_explainer_spec
    from featurescribe.scorers.registry import SCORERS, check_simulator_spec
    from featurescribe.statuses import STRUCTURED_CHOICES

    try:
        check_explainer_spec(o.explainer)
        check_simulator_spec(o.simulator)
    except ValueError as err:
        raise BadOption(str(err)) from None
    bad = [s for s in o.scorer_names if SCORERS.get(s) is None]
    if bad or not o.scorer_names:
        raise BadOption(
            f"unknown scorer(s) {', '.join(bad) or '(none)'}: use {', '.join(SCORERS.names())}")
    for failed, message in ((o.candidates < 1, "--candidates must be at least 1"),
                            (o.concurrency < 1, "--concurrency must be at least 1"),
                            (o.timeout is not None and not 0 < o.timeout < math.inf, "--timeout must be a number of seconds above 0"),
                            (o.logit_lens < 0, "--logit-lens must be 0 or more tokens"),
                            (o.chunk_size < 1, "--chunk-size must be at least 1"),
                            (o.max_failures < 1, "--max-failures must be at least 1"),
                            (o.sim_windows_per_call < 1, "--sim-windows-per-call must be at least 1"),
                            (o.window < 1, "--window must be at least 1 token"),
                            (o.explain_windows is not None and o.explain_windows < 1,
                             "--explain-windows must be at least 1"),
                            (not 0 <= o.batch_poll < math.inf, "--batch-poll must be a number of seconds, 0 or more"),
                            (o.budget_usd is not None and not 0 <= o.budget_usd < math.inf,
                             "--budget-usd must be a number of dollars, 0 or more")):
        if failed:
            raise BadOption(message)
    if o.method not in METHOD_CHOICES:
        raise BadOption(f"unknown --method {o.method!r}: use {', '.join(METHOD_CHOICES)}")
    if o.batch_retry not in BATCH_RETRIES:
        raise BadOption(f"unknown --batch-retry {o.batch_retry!r}: use {' or '.join(BATCH_RETRIES)}")
    if o.task_runner not in RUNNERS:
        raise BadOption(f"unknown task runner {o.task_runner!r}: use {' or '.join(RUNNERS)}")
    if o.dask_address is not None and o.task_runner != "dask":
        raise BadOption("--dask-address is for the Dask task runner: add --task-runner dask")
    if (o.workers is not None and o.workers < 1) or (o.workers is None and o.task_runner == "dask"):
        raise BadOption("--workers must be at least 1")
    check_seed(o.seed)
    if o.structured not in STRUCTURED_CHOICES:
        raise BadOption(f"unknown --structured {o.structured!r}: use {', '.join(STRUCTURED_CHOICES)}")
    if o.no_wait and not o.batch:
        raise BadOption("--no-wait goes with --batch")
    parse_window_counts(o.windows)
    parse_baseline(o.baseline)
    parse_gate(o.gate)
    _check_steering_options(o)


def _check_steering_options(o: "LabelOptions") -> None:
    from featurescribe.steer.calibrate import neutral_prompts

    if o.output_effects < 0:
        raise BadOption("--output-effects must be 0 or more tokens")
    neutral_prompts(o.intervention_prompts)  # a clear error outside 1..the list's length
    if not o.target_kl > 0:
        raise BadOption(f"--target-kl must be a positive number, not {o.target_kl}")


def check_steering(con, o: "LabelOptions") -> None:
    """Fail before any work when the run steers (intervention scorer, --output-effects) and the
    source's model, its hook or its SAE is not usable here. The model is loaded once per process,
    so the run then finds it loaded."""
    if not o.steers:
        return
    from featurescribe.steer.source import check_source_steerable, load_source_steering
    from featurescribe.store.steering import source_row

    source = source_row(con, o.source_id)
    check_source_steerable(source)
    load_source_steering(source)
