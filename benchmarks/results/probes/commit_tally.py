"""Run a probe script and count what the fast refresh decided for its targets: every answer of
q3r._refresh_commit.commit_sketch other than a commit (lagging, exact, untrusted, refine, grown,
widen), and the commits themselves, over the whole run, printed as one TALLY line at the end.

    python benchmarks/results/probes/commit_tally.py SCRIPT [ARGS...]
"""

import collections
import runpy
import sys

import q3r._refresh_commit as C
import q3r._refresh_sketched as RS

ANSWERS = {None: "exact", C.REFINE: "refine", C.NONFINITE: "nonfinite", C.UNTRUSTED: "untrusted", C.LAGGING: "lagging"}
tally = collections.Counter()
commit_sketch = C.commit_sketch


def counting(*args, **kwargs):
    retry = commit_sketch(*args, **kwargs)
    for answer in retry.values():
        tally["grown" if isinstance(answer, C.Grown) else ANSWERS.get(answer, "widen")] += 1
    return retry


def storing(commits, *args, **kwargs):
    tally["commits"] += len(commits)
    return store(commits, *args, **kwargs)


store = C._store_commits
RS.C.commit_sketch = counting  # (the sketched refresh calls it through its module alias)
C._store_commits = storing
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    print("TALLY", dict(tally))
