"""Per-module mutation scores from mutmut's results in ``mutants/`` (run by ``make mutation``).

Usage: ``python tools/mutation_report.py [MODULE.py ...]`` (default: every module mutmut has
results for). Prints one row per module and the surviving mutants' names; ``mutmut show NAME``
prints a survivor's diff. Score = killed (incl. timeouts) / mutants that tests reached.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

MUTANTS = Path("mutants")


def module_results(module: Path) -> dict[str, str]:
    """Mutant name -> status (``killed``, ``survived``, ``timeout``, ``no tests``, ``not checked``, ...)."""
    meta = MUTANTS / (str(module) + ".meta")
    if not meta.is_file():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in sorted(codes.items())}


def main(argv: list[str]) -> int:
    modules = [Path(m) for m in argv] or sorted(
        p.with_suffix("").relative_to(MUTANTS) for p in MUTANTS.rglob("*.py.meta")
    )
    print(f"{'module':<24} {'mutants':>7} {'killed':>6} {'survived':>8} {'no tests':>8} {'unrun':>5} {'score':>6}")
    survivors: list[str] = []
    for module in modules:
        results = module_results(module)
        n = Counter(results.values())
        killed = n["killed"] + n["timeout"]
        reached = killed + n["survived"] + n["suspicious"]
        score = f"{100 * killed / reached:.1f}%" if reached else "-"
        unrun = n["not checked"]
        print(
            f"{module!s:<24} {len(results):>7} {killed:>6} {n['survived']:>8} {n['no tests']:>8} {unrun:>5} {score:>6}"
        )
        survivors += [name for name, status in results.items() if status in ("survived", "suspicious")]
    if survivors:
        print("\nsurvivors (mutmut show NAME; judged equivalent ones are listed in docs/testing.md):")
        print("\n".join(f"  {name}" for name in survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
