import json, sys, collections
rows = []
for f in sys.argv[1:]:
    rows += json.load(open(f))
g = collections.defaultdict(list)
for r in rows:
    g[(r["method"], r.get("sched", "min"), r["lmbda"])].append(r)
print(f"{'method':8s} {'sched':5s} {'lmbda':>5s} {'seeds':>7s} | {'dense':>6s} {'@20%':>6s} {'drop20':>6s} {'@10%':>6s} {'drop10':>6s} | {'tail@20':>7s} {'tail@10':>7s} {'effrank':>7s}   per-seed (dense/@20/@10)")
for k, rs in g.items():
    m = lambda key: 100 * sum(r[key] for r in rs) / len(rs)
    a = lambda key: sum(r[key] for r in rs) / len(rs)
    per = " ".join(f"{100*r['dense']:.1f}/{100*r['acc@0.2']:.1f}/{100*r['acc@0.1']:.1f}" for r in rs)
    print(f"{k[0]:8s} {k[1]:5s} {k[2]:5g} {','.join(str(r['seed']) for r in rs):>7s} | {m('dense'):6.2f} {m('acc@0.2'):6.2f} {m('dense')-m('acc@0.2'):6.2f} {m('acc@0.1'):6.2f} {m('dense')-m('acc@0.1'):6.2f} | {a('tail@0.2'):7.3f} {a('tail@0.1'):7.3f} {a('eff_rank'):7.2f}   {per}")
