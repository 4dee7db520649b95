"""Replay the stop / continue decision over expert arrival orders and score it against what really happened.

For one method of a sweep table and each arrival order (a permutation of the M experts), the decision at
arrival k is taken exactly as the pipeline takes it (merging.scaling_law.decision.decide on the prefix points 1 … k) and
compared with the truth the table holds: the real gain of expert k + 1. No merge is run: every prefix of every
order must be a subset the sweep measured (the `diverse` design with `max_subsets` = orders, same seed, has
them all).

- worth it: the next expert's real gain is above min_gain;
- regret of an order: U(best k) − U(k where the rule stopped), U(k) = −min(L(1) … L(k)) − min_gain·k: the
  pipeline serves the champion (the best model merged so far) and min_gain is the price of one more expert in
  nats (the rule stops at its first `stop`; without one it merges all M);
- forecast error: the law fitted on the first k points, its L(M) against the measured L(M).
The old rule (the point estimate of the gain against min_gain, no band, no check of the law) is replayed on
the same fits as the peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from merging.errors import ConfigError
from merging.scaling_law.curve import fit_curve
from merging.scaling_law.decision import DecisionRule, decide
from merging.sweep.designs import diverse_permutations
from merging.sweep.table import SUBSET_SEPARATOR

ACTIONS = ("continue", "uncertain", "law_fails", "stop")


@dataclass
class MethodBacktest:
    method: str
    orders: int
    pool_size: int
    confusion: dict[str, dict[str, int]]  # action -> {"worth": n, "not_worth": n}, decisions at k < M
    target_stops: int  # stops because the target loss was met (always right)
    regret: list[float]  # per order, nats
    stop_k: list[int]  # per order
    legacy_confusion: dict[str, dict[str, int]]
    legacy_regret: list[float]
    legacy_stop_k: list[int]
    forecast_error: dict[int, list[float]]  # points used -> relative error of L(M) per order (NaN: no fit)
    last_value_error: dict[int, list[float]]  # the naive forecast "L stays at L(k)"
    final_loss: float  # L(M), measured
    target_loss: float | None
    target_reached: int = 0  # orders whose stopping point met the target
    decisions: list[dict] = field(default_factory=list)  # every (order, k) decision, for the record

    def summary(self) -> dict:
        def rates(confusion: dict[str, dict[str, int]]) -> dict[str, float]:
            stop, go = confusion["stop"], {key: sum(confusion[a][key] for a in ACTIONS if a != "stop")
                                           for key in ("worth", "not_worth")}
            return {"wrong_stops": stop["worth"], "right_stops": stop["not_worth"],
                    "stop_precision": stop["not_worth"] / max(1, stop["worth"] + stop["not_worth"]),
                    "missed_stops": go["not_worth"], "right_continues": go["worth"]}

        return {
            "method": self.method, "orders": self.orders, "final_loss": self.final_loss,
            "target_loss": self.target_loss, "target_reached": self.target_reached,
            "target_stops": self.target_stops,
            "confusion": self.confusion, "rates": rates(self.confusion),
            "mean_regret": float(np.mean(self.regret)), "mean_stop_k": float(np.mean(self.stop_k)),
            "legacy": {"confusion": self.legacy_confusion, "rates": rates(self.legacy_confusion),
                       "mean_regret": float(np.mean(self.legacy_regret)),
                       "mean_stop_k": float(np.mean(self.legacy_stop_k))},
            "forecast_mean_abs_error": {k: _nan_mean_abs(errors) for k, errors in self.forecast_error.items()},
            "last_value_mean_abs_error": {k: _nan_mean_abs(errors) for k, errors in self.last_value_error.items()},
            "forecast_failed_fits": {k: int(np.isnan(errors).sum()) for k, errors in self.forecast_error.items()},
        }


def _nan_mean_abs(errors: list[float]) -> float | None:
    values = np.abs(np.asarray(errors, dtype=float))
    return None if np.all(np.isnan(values)) else float(np.nanmean(values))


def macro_by_subset(columns: dict[str, list], size: str, method: str) -> dict[str, float]:
    """The macro CE (mean over the evaluated domains) of each subset label of one size and method."""
    sums: dict[str, list[float]] = {}
    for row_size, row_method, subset, ce in zip(columns["size"], columns["method"], columns["subset"],
                                                columns["ce"], strict=True):
        if row_size == size and row_method == method:
            sums.setdefault(subset, []).append(ce)
    if not sums:
        raise ConfigError(f"the sweep table has no rows for method {method!r} at size {size!r}")
    return {subset: float(np.mean(values)) for subset, values in sums.items()}


def arrival_orders(macro: dict[str, float], orders: int, seed: int) -> tuple[list[str], list[tuple[int, ...]]]:
    """The pool's expert names (sorted, as the sweep numbers them) and the seeded diverse arrival orders."""
    names = sorted(label for label in macro if SUBSET_SEPARATOR not in label)
    if not names:
        raise ConfigError("the sweep table has no single-expert subsets (k = 1); sweep every k")
    return names, diverse_permutations(len(names), orders, seed)


def backtest(macro: dict[str, float], method: str, rule: DecisionRule, orders: int = 20, seed: int = 0,
             forecast_points: tuple[int, ...] = (3, 4, 5)) -> MethodBacktest:
    names, permutations = arrival_orders(macro, orders, seed)
    pool = len(names)

    def prefix_loss(order: tuple[int, ...], k: int) -> float:
        label = SUBSET_SEPARATOR.join(names[i] for i in sorted(order[:k]))
        if label not in macro:
            raise ConfigError(f"{method}: subset {label} (a prefix of arrival order {order}) is not in the sweep; "
                              f"sweep with --design diverse --max-subsets {orders} --seed {seed}")
        return macro[label]

    result = MethodBacktest(method, orders, pool, _empty_confusion(), 0, [], [], _empty_confusion(), [], [],
                            {k: [] for k in forecast_points}, {k: [] for k in forecast_points},
                            prefix_loss(permutations[0], pool), rule.target_loss)
    for index, order in enumerate(permutations):
        losses = [prefix_loss(order, k) for k in range(1, pool + 1)]
        points = list(zip(range(1, pool + 1), losses, strict=True))
        stop, legacy_stop = pool, pool
        for k in range(1, pool):
            verdict = decide(points[:k], k, losses[k - 1], rule)
            worth = "worth" if losses[k - 1] - losses[k] > rule.min_gain else "not_worth"
            target_met = rule.target_loss is not None and losses[k - 1] <= rule.target_loss
            legacy = "stop" if target_met or (verdict.predicted_gain is not None
                                              and verdict.predicted_gain <= rule.min_gain) else "continue"
            if target_met:
                result.target_stops += 1
            else:
                result.confusion[verdict.action][worth] += 1
                result.legacy_confusion[legacy][worth] += 1
            if verdict.stops and stop == pool:
                stop = k
            if legacy == "stop" and legacy_stop == pool:
                legacy_stop = k
            result.decisions.append({"order": index, "k": k, "loss": losses[k - 1], "next_gain": losses[k - 1] -
                                     losses[k], "action": verdict.action, "legacy": legacy, "reason": verdict.reason})
        utility = [-min(losses[:k]) - rule.min_gain * k for k in range(1, pool + 1)]  # the champion's loss
        result.stop_k.append(stop)
        result.legacy_stop_k.append(legacy_stop)
        result.regret.append(max(utility) - utility[stop - 1])
        result.legacy_regret.append(max(utility) - utility[legacy_stop - 1])
        if rule.target_loss is not None and losses[stop - 1] <= rule.target_loss:
            result.target_reached += 1
        for k in forecast_points:
            result.forecast_error[k].append(_forecast_error(points[:k], pool, losses[-1]))
            result.last_value_error[k].append((losses[k - 1] - losses[-1]) / losses[-1])
    return result


def _empty_confusion() -> dict[str, dict[str, int]]:
    return {action: {"worth": 0, "not_worth": 0} for action in ACTIONS}


def _forecast_error(points: list[tuple[int, float]], pool: int, measured: float) -> float:
    try:
        predicted = float(fit_curve(*zip(*points, strict=True)).params.loss(pool))
    except ConfigError:
        return float("nan")
    return (predicted - measured) / measured
