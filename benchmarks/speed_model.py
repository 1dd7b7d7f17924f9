"""The planner's speed model against the H200 measurements (issue 11, target P3c).

    python benchmarks/speed_model.py            # predicted ÷ measured per config, medians
    python benchmarks/speed_model.py --loo      # also leave-one-out: refit without each config

The data (benchmarks/gpu/h200-2026-11-27/) are single 512 + 128-token runs of a synthetic
full-size Qwen3-30B-A3B Q4_K_M on an NVIDIA H200 box (16 Xeon vCPUs); the model's defaults
were calibrated on them, so the in-sample figures say how well the model's shape explains the
data, and leave-one-out how well it predicts a placement it has not seen.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

from qwenrun import catalog
from qwenrun.planner import speed
from qwenrun.planner.facts import ModelFacts
from qwenrun.planner.recipes import estimate
from qwenrun.testing.h200 import measurements


def _ratio(m: speed.Measurement, p: speed.SpeedParams, prefill: bool) -> float:
    if prefill:
        assert m.prefill_tok_s
        return speed.predict_prefill(m.work, m.machine, m.prompt_tokens, 512, p) / m.prefill_tok_s
    assert m.decode_tok_s
    return speed.predict_decode(m.work, m.machine, m.context_tokens, p) / m.decode_tok_s


def _line(name: str, values: list[float]) -> str:
    return (
        f"{name:<32} median {statistics.median(values):.3f}  "
        f"range {min(values):.2f}-{max(values):.2f}  "
        f"outside 0.7-1.3: {sum(1 for v in values if not 0.7 <= v <= 1.3)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loo", action="store_true", help="leave-one-out refits (about a minute)")
    args = ap.parse_args()
    facts = ModelFacts.from_info(estimate(catalog.lookup("qwen3-30b-a3b"), "Q4_K_M"))
    runs = measurements(facts)
    synthetic = replace(speed.DEFAULT, prefill_expert_coverage=speed.H200_SYNTHETIC_COVERAGE)
    print(f"{'config':<10} {'measured':>9} {'predicted':>9} {'ratio':>6}   prefill ratio")
    for m in runs:
        pred = speed.predict_decode(m.work, m.machine, m.context_tokens)
        ratio = _ratio(m, speed.DEFAULT, False)
        print(
            f"{m.name:<10} {m.decode_tok_s:>9.1f} {pred:>9.1f} {ratio:>6.2f}"
            f"   {_ratio(m, synthetic, True):.2f}"
        )
    print()
    print(_line("decode, defaults", [_ratio(m, speed.DEFAULT, False) for m in runs]))
    print(_line("prefill, synthetic coverage", [_ratio(m, synthetic, True) for m in runs]))
    print(_line("prefill, real-text coverage", [_ratio(m, speed.DEFAULT, True) for m in runs]))
    if args.loo:
        loo = []
        for i, held in enumerate(runs):
            rest = runs[:i] + runs[i + 1 :]
            fitted = speed.fit(
                rest,
                decode_priors=speed.GENERIC_DECODE_PRIORS,
                prefill_priors=speed.GENERIC_PREFILL_PRIORS,
            )
            loo.append(_ratio(held, fitted, False))
        print(_line("decode, leave-one-out", loo))


if __name__ == "__main__":
    main()
