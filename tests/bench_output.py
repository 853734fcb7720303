"""Reading a benchmark's output: run it in --quick mode, parse its ratio and figure lines, check them.

Used by test_bench*.py. Every benchmark runs end to end in --quick mode and prints a machine line and its
ratio lines.

No timing goal is asserted: the figures of a --quick run mean nothing. What is asserted is the output's
content: each ratio line parses, its number is finite and in a sane range, it is the quotient of the
figures printed above it (to their printed precision), and its MET / NOT MET verdict agrees with its goal.
Each run is a child process of 5 to 90 seconds (the flow benchmarks start Prefect's ephemeral server), so
the test modules are marked slow.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.common import HANG_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
# bench/_common.py ratio_line: "ratio: <name> = <value, 3 decimals><unit>[ (goal <goal>) MET|NOT MET]"
RATIO = re.compile(r"^ratio: (?P<name>.+?) = (?P<value>-?\d+\.\d{3}|-?nan|-?inf)(?P<unit>%|x)?"
                   r"(?: \(goal (?P<goal>.+)\) (?P<verdict>MET|NOT MET))?$", re.M)
GOAL = re.compile(r"(<=|>=|<|>) ?(\d+(?:\.\d+)?)")
ROUNDING = 0.0005  # half the last printed digit of a ratio


@dataclass(frozen=True)
class Ratio:
    value: float
    unit: str
    goal: str | None
    met: bool | None

    def goal_holds(self) -> bool | None:
        """Whether the value meets the goal's bound; None when the printed value is too close to tell."""
        op, bound = GOAL.search(self.goal).groups()
        bound = float(bound)
        if abs(self.value - bound) <= ROUNDING:
            return None
        return {"<=": self.value <= bound, "<": self.value < bound, ">=": self.value >= bound,
                ">": self.value > bound}[op]


def run_bench(name: str, tmp_path: Path, timeout: float = HANG_TIMEOUT_S, args: tuple[str, ...] = ()) -> str:
    env = {**os.environ, "STAGE1_BENCH_DATA": str(tmp_path.parent / "bench-data")}
    # a bench is a script run from a shell, which imports its helpers (bench/_common.py) from its own
    # folder; the test session's environment carries stage1's PYTHONSAFEPATH=1 (stage1core.home), which
    # is meant for stage1's own children and would drop that folder from the path
    env.pop("PYTHONSAFEPATH", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert re.search(r'^machine: \{.*"cores"', proc.stdout, re.M), proc.stdout
    return proc.stdout


def ratios(out: str) -> dict[str, Ratio]:
    """Every ratio line of `out` by name, each checked: finite, non-negative, a verdict iff a goal, and a
    verdict that agrees with the goal (a MET always meets the goal's bound)."""
    found = {m["name"]: Ratio(float(m["value"]), m["unit"] or "", m["goal"],
                              None if m["verdict"] is None else m["verdict"] == "MET") for m in RATIO.finditer(out)}
    assert found and len(found) == len(re.findall(r"^ratio: ", out, re.M)), out  # every ratio line parses
    for name, r in found.items():
        assert math.isfinite(r.value) and r.value >= 0, (name, r)
        assert r.unit in ("%", "x", ""), (name, r)
        assert (r.goal is None) == (r.met is None), (name, r)
        if r.met:
            assert r.goal_holds() in (True, None), (name, r)
    return found


def verdict_is_the_goal(r: Ratio) -> None:
    """For a ratio whose verdict weighs nothing but its own value: MET exactly when the goal holds."""
    assert r.goal_holds() in (r.met, None), r


def figure(out: str, pattern: str) -> float:
    """The one number a figure line's `pattern` (a regex with one group) captures."""
    (value,) = re.findall(pattern, out, re.M)
    return float(value)


def quotient_of(r: Ratio, num: float, den: float, *, decimals: int, scale: float = 1.0) -> None:
    """`r` is num / den (times `scale`), num and den printed to `decimals` places: it lies within the
    quotient's range over their rounding, and its own."""
    h = 0.5 * 10 ** -decimals
    low, high = scale * max(num - h, 0) / (den + h), scale * (num + h) / max(den - h, 1e-12)
    assert low - ROUNDING <= r.value <= high + ROUNDING, (r, num, den, low, high)


def is_cosine(r: Ratio) -> None:
    assert r.unit == "" and 0.9 <= r.value <= 1.0, r  # the same images through two paths: nearly parallel


def check_warm_over_cold(out: str, found: dict[str, Ratio], *, cold: str, warm: list[str], goal: str) -> None:
    """The warm / cold ratio is the fastest warm run over the cold run, and no warm run embedded anything."""
    seconds = {label: figure(out, rf"^  {label}: ([\d.]+) s") for label in (cold, *warm)}
    r = found["warm / cold wall time"]
    assert r.unit == "%" and r.goal == goal
    verdict_is_the_goal(r)
    quotient_of(r, min(seconds[label] for label in warm), seconds[cold], decimals=2, scale=100)
    for label in warm:
        assert re.search(rf"^  {label}: .*\b0 images embedded", out, re.M), out
