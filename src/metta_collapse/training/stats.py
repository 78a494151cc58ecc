"""Statistics over seeds for the validation and `compare --group`: paired differences with bootstrap intervals,
rliable's interquartile mean and probability of improvement, the agent steps to regain the pre-cut level, and how
to print a spread.

Scores are per seed: one run gives one number (e.g. its mean reward over its last epochs). Arms branched from one
baseline share each seed's pre-cut history, so two arms are compared seed by seed where they can be.
"""

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import scipy.stats

CONFIDENCE = 0.95


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], seed: int = 0, reps: int = 10_000) -> dict | None:
    """a[s] - b[s] over the seeds both have: {"mean", "low", "high", "n", "excludes_zero", "seeds"}, the 95 %
    interval by a percentile bootstrap over seeds (`seed` fixes its draws). n = 1: low, high and excludes_zero are
    None; n = 0: None."""
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return None
    differences = np.array([a[s] - b[s] for s in seeds], dtype=float)
    mean = float(differences.mean())
    low = high = excludes = None
    if len(seeds) > 1:
        # percentile, not BCa: BCa is undefined when every seed's difference is the same
        interval = scipy.stats.bootstrap(
            (differences,),
            np.mean,
            n_resamples=reps,
            confidence_level=CONFIDENCE,
            method="percentile",
            random_state=seed,
        ).confidence_interval
        low, high = float(interval.low), float(interval.high)
        excludes = bool(low > 0 or high < 0)
    return {"mean": mean, "low": low, "high": high, "n": len(seeds), "excludes_zero": excludes, "seeds": seeds}


def rliable_summary(
    scores: Mapping[str, Sequence[float]],
    pairs: Iterable[tuple[str, str]] | None = None,
    reps: int = 2_000,
    seed: int = 0,
) -> dict:
    """rliable's estimates over arms: `scores[arm]` holds one score per run (seed), a single task.

    Returns {"iqm": {arm: {"iqm", "low", "high", "n"}}, "probability_of_improvement": [{"x", "y", "probability",
    "low", "high", "n_x", "n_y"}]}: P(a run of x scores above a run of y), for each (x, y) in `pairs` (default: every
    other arm over the first). Intervals are rliable's stratified bootstrap (95 %, percentile, `reps` draws); None
    where an arm has fewer than 2 runs."""
    # imported here: rliable pulls in arch, pandas and seaborn, which only these estimates need
    from rliable import library, metrics

    logging.getLogger("absl").setLevel(logging.WARNING)  # rliable logs a line per estimate
    arms = {name: np.asarray(values, dtype=float).reshape(-1, 1) for name, values in scores.items()}
    names = list(arms)
    pairs = list(pairs) if pairs is not None else [(name, names[0]) for name in names[1:]]

    def estimate(data: np.ndarray | list[np.ndarray], func) -> tuple[float, float | None, float | None]:
        """rliable's point estimate and interval: an array is one arm's runs, a list the arms compared."""
        samples = data if isinstance(data, list) else [data]
        point = float(func(*samples)[0])
        if min(len(sample) for sample in samples) < 2:
            return point, None, None
        with warnings.catch_warnings():
            # rliable seeds arch's bootstrap through `random_state`, which arch 7 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            _, intervals = library.get_interval_estimates(
                {"arm": data},
                func,
                reps=reps,
                confidence_interval_size=CONFIDENCE,
                random_state=np.random.RandomState(seed),
            )
        low, high = intervals["arm"][:, 0]
        return point, float(low), float(high)

    iqm = {}
    for name, data in arms.items():
        point, low, high = estimate(data, lambda x: np.array([metrics.aggregate_iqm(x)]))
        iqm[name] = {"iqm": point, "low": low, "high": high, "n": len(data)}
    improvement = []
    for x, y in pairs:
        point, low, high = estimate(
            [arms[x], arms[y]], lambda sx, sy: np.array([metrics.probability_of_improvement(sx, sy)])
        )
        improvement.append(
            {"x": x, "y": y, "probability": point, "low": low, "high": high, "n_x": len(arms[x]), "n_y": len(arms[y])}
        )
    return {"iqm": iqm, "probability_of_improvement": improvement}


def level_before_cut(steps: Sequence[float], values: Sequence[float], cut_step: float, window: int) -> float | None:
    """The mean of the last `window` values at or before the cut (the level to regain); None if there are none."""
    before = [value for step, value in zip(steps, values, strict=True) if step <= cut_step][-window:]
    return float(np.mean(before)) if before else None


def steps_to_regain(
    steps: Sequence[float], values: Sequence[float], cut_step: float, level: float | None, window: int
) -> float | None:
    """Steps after the cut until the trailing mean of up to `window` epochs after the cut first reaches `level`
    (the same seed's baseline level, see `level_before_cut`); None if it never does or there is no level. An int
    when the steps are. Only epochs after the cut count: a window reaching back across it would credit the
    pre-cut policy with the recovery."""
    if level is None:
        return None
    after = [(step, value) for step, value in zip(steps, values, strict=True) if step > cut_step]
    for i, (step, _) in enumerate(after):
        if np.mean([value for _, value in after[max(0, i - window + 1) : i + 1]]) >= level:
            return step - cut_step
    return None


def format_spread(mean: float | None, spread: float | None, n: int, spec: str = ".4g") -> str:
    """`mean ± spread (n=N)`; one run has no spread, so `mean (n=1)`: a ±0 would read as precision."""
    if mean is None or n == 0:
        return "-"
    if n == 1 or spread is None:
        return f"{mean:{spec}} (n={n})"
    return f"{mean:{spec}} ± {spread:{spec.replace('+', '')}} (n={n})"


def format_interval(estimate: dict | None, key: str = "mean", spec: str = ".4g") -> str:
    """`mean [low, high] (n=N)` from `paired_difference` (or an rliable estimate, with `key`); no interval for n=1."""
    if estimate is None:
        return "-"
    n = estimate["n"] if "n" in estimate else f"{estimate['n_x']} vs {estimate['n_y']}"
    if estimate["low"] is None:
        return f"{estimate[key]:{spec}} (n={n})"
    return f"{estimate[key]:{spec}} [{estimate['low']:{spec}}, {estimate['high']:{spec}}] (n={n})"
