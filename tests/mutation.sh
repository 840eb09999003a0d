#!/usr/bin/env bash
# Mutation testing of the taxonomy, classification, diagnosis, header and stats modules
# (mutmut 3.x; [tool.mutmut] in pyproject.toml). Not in CI: see tests/MUTATION.md.
#
#   bash tests/mutation.sh            # run (incremental: ./mutants is reused), then the counts
#   bash tests/mutation.sh --fresh    # start from a clean ./mutants
#   MUTMUT_CHILDREN=1 bash tests/mutation.sh
#
# Runs on the interpreted sources only: a compiled proxy/*.so would be copied into ./mutants
# and imported instead of the mutated source, so every mutant would "survive".
set -euo pipefail
cd "$(dirname "$0")/.."

shopt -s nullglob
shopt -s globstar
compiled=(proxy/**/*.so)
if ((${#compiled[@]})); then
  echo "mutation.sh: compiled modules in proxy/ (${compiled[*]}); remove them:" \
    "find proxy -name '*.so' -delete" >&2
  exit 2
fi
if [[ ${1:-} == --fresh ]]; then
  rm -rf mutants
fi

start=$SECONDS
python3 -m mutmut run --max-children "${MUTMUT_CHILDREN:-2}" || true
echo
echo "mutmut run: $((SECONDS - start)) s"
# Counts per module, from mutmut's own records (mutants/proxy/**/*.py.meta).
python3 - <<'PY'
import json
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

columns = ["killed", "survived", "no tests", "timeout", "suspicious", "segfault", "not checked"]
print(f"{'module':<28}" + "".join(f"{c:>12}" for c in columns) + f"{'total':>7}")
for meta in sorted(Path("mutants/proxy").rglob("*.py.meta")):
    codes = json.loads(meta.read_text())["exit_code_by_key"].values()
    counts = Counter(status_by_exit_code[code] for code in codes)
    other = sum(n for status, n in counts.items() if status not in columns)
    row = "".join(f"{counts[c]:>12}" for c in columns)
    extra = f"  (+{other} other)" if other else ""
    name = str(meta.relative_to("mutants"))[: -len(".meta")]
    print(f"{name:<28}{row}{sum(counts.values()):>7}{extra}")
PY
