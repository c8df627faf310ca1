"""The options of a label run, declared once.

`LabelOptions` is what `featurescribe label` parses (`add_arguments`), what the Prefect label
flow takes as parameters (`flow_signature`: the flow's signature is made from these fields), and
what the pipeline steps read (`prepare_chunk`, `compute_chunk`, ...). A new option is one field
here, with its help text in `opt(...)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import asdict
from typing import Any

from featurescribe.errors import BadOption
from featurescribe.options import (add_option_arguments, opt, options_class, options_from_args, options_signature,
                                   required)
from featurescribe.llm.breaker import DEFAULT_MAX_FAILURES
from featurescribe.records import KINDS, SPLITS
from featurescribe.statuses import STRUCTURED_CHOICES
from featurescribe.store.sampling import DEFAULT_COUNTS, SamplingConfig

DEFAULT_CHUNK_SIZE = 256
RUNNERS = ("thread", "dask")
BATCH_RETRIES = ("batch", "direct")
METHOD_CHOICES = ("auto", "pairs", "highlighted", "marked")
POLL_DEFAULT_S = 30.0
DEFAULT_BASELINE = "sample:10"
BATCH_GROUP = "batch APIs (half price, results within 24 h)"


def format_counts(counts) -> str:
    return ", ".join(f"{s}.{k}={n}" for s, kinds in counts.items() for k, n in kinds.items() if n)


@options_class
class LabelOptions:
    """The options of `featurescribe label`, of `featurescribe.label(...)` and of the label flow."""

    source: str = required("SOURCE_ID, e.g. 6-mlp (harvest prints it)")
    features: str = opt("all", "which features: 0:64, 3,17,40, all or alive (default: all; dead and "
                               "rare features are marked and reported, not explained)")
    explainer: str = opt("baseline:tokens", "{explainers} (default: baseline:tokens)")
    simulator: str = opt("lexical", "{simulators} (default: lexical)")
    scorers: str = opt("simulation", "comma-separated: {scorers} (default: simulation)")
    sim_windows_per_call: int = opt(5, "windows an openai:/anthropic: simulator scores in one request "
                                       "(default: 5; 1: one request per window, as before). The "
                                       "score is the same: same windows, same correlation")
    baseline: str = opt(DEFAULT_BASELINE, "shuffled-explanation baseline: sample:N (one feature in N gets "
                                          "its own; the others carry the run's population baseline, the "
                                          f"mean over those that have one; default: {DEFAULT_BASELINE}), "
                                          "every (each score gets its own: twice the simulation calls) or "
                                          "none. baseline_tokens is beside every simulation score anyway",
                        metavar="every|sample:N|none")
    gate: str = opt("", "intruder:T: before explaining, the intruder test (which of 5 windows does "
                        "not belong; judged by the simulator's backend) on each feature; one whose "
                        "accuracy is below T (0-1; chance is 0.2) stays unlabelled with status "
                        "'gated', paying for no explanation or scoring", metavar="intruder:T")
    candidates: int = opt(1, "explanations per feature; with more than 1, the best on the valid split "
                             "is chosen (default: 1)")
    concurrency: int = opt(16, "LLM requests in flight (default: 16)")
    timeout: float | None = opt(None, "seconds one LLM request may take before it counts as a timeout "
                                      "(default: FEATURESCRIBE_LLM_TIMEOUT_<KIND>, else "
                                      "FEATURESCRIBE_LLM_TIMEOUT, else 120)", metavar="S")
    budget_usd: float | None = opt(None, "no new LLM call starts once the run has spent this much")
    max_failures: int = opt(DEFAULT_MAX_FAILURES, "stop the run when a backend's calls fail this many "
                                                  "times in a row with the same kind (connection, auth, "
                                                  "unknown model, unparseable answers; retries count) "
                                                  f"(default: {DEFAULT_MAX_FAILURES})", metavar="N")
    no_cache: bool = opt(False, "do not answer from the response cache")
    method: str = opt("auto", "how LLM explainers see the examples: pairs (token and activation per "
                              "line), highlighted (active tokens in << >>, listed with activations) or "
                              "marked (active tokens in << >> only); default auto: marked for local "
                              "models, else pairs", choices=METHOD_CHOICES)
    structured: str = opt("auto", "how openai: backends ask for structured answers: json_schema, "
                                  "json_object (schema stated in the prompt) or text (schema in the "
                                  "prompt, answer parsed strictly); default auto: the best form the "
                                  "server takes, learnt from its refusals and remembered per server "
                                  "and model", choices=STRUCTURED_CHOICES)
    chunk_size: int = opt(DEFAULT_CHUNK_SIZE, f"features per chunk (default: {DEFAULT_CHUNK_SIZE})")
    explain_windows: int | None = opt(None, "show the explainer at most this many windows (default: all "
                                            "of the explain split; small local models want fewer)")
    logit_lens: int = opt(0, "show LLM explainers the K (default 10) tokens each feature's output "
                             "direction promotes most, read through the source model's unembedding "
                             "(loads the model)", nargs="?", const=10, metavar="K")
    output_effects: int = opt(0, "show LLM explainers the K (default 10) tokens whose next-token probability "
                                 "rises and falls most when the feature is steered (loads the source's "
                                 "model)", nargs="?", const=10, metavar="K")
    intervention_prompts: int = opt(8, "neutral prompts the intervention scorer and --output-effects steer "
                                       "on (default 8)", metavar="N")
    target_kl: float = opt(2.0, "steering strength is calibrated per feature to this next-token KL "
                                "(default 2.0)")
    window: int = opt(32, "tokens per example window (default: 32)")
    windows: str = opt("", "windows per split and kind, changing the defaults "
                           f"({format_counts(DEFAULT_COUNTS)}); e.g. test.top=5,test.random=5 for a "
                           "cheaper local judge. Features sampled before keep their windows",
                       metavar="SPLIT.KIND=N,...")
    seed: int = opt(0, "sampling seed, a whole number from 0 to 2^63 - 1 (default: 0)")
    redo: bool = opt(False, "label features that already have a scored label by this explainer too")
    no_progress: bool = opt(False, "no progress bar or progress lines")
    batch: bool = opt(False, "send the openai:/anthropic: requests as provider batches (OpenAI Batch, "
                             "Anthropic Message Batches) at the batch price", group=BATCH_GROUP)
    no_wait: bool = opt(False, "with --batch: submit and return; run the same command again later to "
                               "collect and go on", group=BATCH_GROUP)
    batch_retry: str = opt("batch", "errored, expired or cancelled requests go in a new batch (default) "
                                    "or directly through the ordinary API at the list price",
                           choices=BATCH_RETRIES, group=BATCH_GROUP)
    batch_poll: float = opt(POLL_DEFAULT_S, "first wait between polls, growing 1.5x up to 10 min "
                                            f"(default: {POLL_DEFAULT_S:g})", metavar="S", group=BATCH_GROUP)
    task_runner: str = opt("thread", "thread (default): chunks run in this process; dask: chunks spread "
                                     "over a Dask cluster (the database is still written by this "
                                     "process only)", choices=RUNNERS)
    workers: int = opt(2, "dask: worker processes of the local cluster (default: 2)")
    dask_address: str | None = opt(None, "dask: use the running cluster at this scheduler address "
                                         "(tcp://host:8786) instead of starting a local one",
                                   metavar="ADDRESS")

    def __post_init__(self) -> None:
        from featurescribe.flows.label_checks import check_options

        check_options(self)

    # ----------------------------------------------------------------- what the pipeline reads
    @property
    def source_id(self) -> str:
        return self.source

    @property
    def scorer_names(self) -> tuple[str, ...]:
        return tuple(s.strip().lower() for s in self.scorers.split(",") if s.strip())

    @property
    def use_cache(self) -> bool:
        return not self.no_cache

    @property
    def skip_done(self) -> bool:
        return not self.redo

    @property
    def progress(self) -> bool:
        return not self.no_progress

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig.with_counts(parse_window_counts(self.windows), window=self.window,
                                          seed=self.seed)

    @property
    def baseline_every(self) -> int:
        """1 in how many features gets its own shuffled baseline (0: none)."""
        return parse_baseline(self.baseline)

    @property
    def gate_threshold(self) -> float | None:
        """The intruder gate's threshold (None: no gate)."""
        return parse_gate(self.gate)

    @property
    def method_name(self) -> str:
        """What `explanations.method` records: the prompt style, or the no-LLM explainer's own."""
        from featurescribe.labelers import method_name

        return method_name(self.explainer, self.method)

    @property
    def n_candidates(self) -> int:
        from featurescribe.labelers import is_llm_explainer

        return self.candidates if is_llm_explainer(self.explainer) else 1

    @property
    def steers(self) -> bool:
        """Whether the run loads the source's model to steer it (the intervention scorer, or
        --output-effects with an LLM explainer)."""
        from featurescribe.labelers import is_llm_explainer

        return "intervention" in self.scorer_names or (self.output_effects > 0 and is_llm_explainer(self.explainer))

    def intervention_config(self):
        from featurescribe.scorers.intervention import InterventionConfig

        return InterventionConfig(n_prompts=self.intervention_prompts, target_kl=self.target_kl)

    def replace(self, **changes: Any) -> "LabelOptions":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The pipeline's parameters as `runs.params` records them."""
        d = {k: v for k, v in asdict(self).items() if k not in RUN_ONLY}
        d["source_id"] = d.pop("source")
        d["scorers"] = list(self.scorer_names)
        d["sampling"] = self.sampling.as_dict()
        return d


# options that say how a run is carried out, not what it computes
RUN_ONLY = ("no_progress", "batch", "no_wait", "batch_retry", "batch_poll", "task_runner", "workers",
            "dask_address", "max_failures")


def parse_baseline(spec: str) -> int:
    """'every' -> 1, 'sample:N' -> N, 'none' -> 0; BadOption for anything else."""
    text = (spec or DEFAULT_BASELINE).strip().lower()
    if text in ("every", "none"):
        return 1 if text == "every" else 0
    kind, _, n = text.partition(":")
    if kind == "sample" and n.isdigit() and int(n) >= 1:
        return int(n)
    raise BadOption(f"bad --baseline {spec!r}: use every, sample:N (N >= 1) or none")


def parse_gate(spec: str) -> float | None:
    """'' -> None, 'intruder:0.4' -> 0.4; BadOption for anything else."""
    text = (spec or "").strip().lower()
    if not text:
        return None
    kind, _, value = text.partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if kind != "intruder" or not 0.0 <= threshold <= 1.0:
        raise BadOption(f"bad --gate {spec!r}: use intruder:T with T from 0 to 1")
    return threshold


def parse_window_counts(spec: str) -> dict[str, dict[str, int]]:
    """DEFAULT_COUNTS changed by 'split.kind=n,...' (BadOption for anything else)."""
    counts = {s: dict(DEFAULT_COUNTS.get(s, {})) for s in SPLITS}
    for item in (x.strip() for x in (spec or "").split(",")):
        if item:
            split, kind, n = _window_item(item)
            counts[split][kind] = n
    for split, what in (("explain", "the explainer needs windows"), ("test", "nothing to score on")):
        if not sum(counts[split].get(k, 0) for k in KINDS):
            raise BadOption(f"--windows leaves the {split} split empty: {what}")
    return counts


def _window_item(item: str) -> tuple[str, str, int]:
    key, eq, value = item.partition("=")
    split, dot, kind = key.strip().partition(".")
    if not (eq and dot) or split not in SPLITS or kind not in KINDS:
        raise BadOption(
            f"bad --windows item {item!r}: use SPLIT.KIND=N with SPLIT one of {', '.join(SPLITS)} "
            f"and KIND one of {', '.join(KINDS)}")
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise BadOption(f"bad --windows item {item!r}: N must be a whole number >= 0")
    return split, kind, n


# --------------------------------------------------------------------- the CLI and the flow
def _choices_help() -> dict[str, str]:
    """What `{explainers}`, `{simulators}` and `{scorers}` in help texts stand for: the registries."""
    from featurescribe.labelers.registry import explainer_specs_help
    from featurescribe.scorers.registry import SCORERS, simulator_specs_help

    return {"explainers": explainer_specs_help(), "simulators": simulator_specs_help(),
            "scorers": ", ".join(SCORERS.names())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field of LabelOptions (booleans are flags)."""
    add_option_arguments(parser, LabelOptions, _choices_help())


def from_args(args: argparse.Namespace) -> LabelOptions:
    return options_from_args(LabelOptions, args)


def flow_signature(**leading: type) -> inspect.Signature:
    """Keyword-only parameters: `leading` ones (db), then one per field of LabelOptions."""
    return options_signature(LabelOptions, **leading)
