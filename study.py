"""
The mini-CME study: the paper's comparisons and its ablation, in miniature, on a CPU, with seeds.

    python study.py                        # every run below, 3 seeds: about 45 minutes on a 2-core CPU
    python study.py --seeds=1 --steps=100  # a quick look
    python study.py --report               # print the tables again from the finished runs

Each run is train.py with one configuration (the code path of a real run), fine-tuning the tiny
base that `python train.py` pretrains on the synthetic mini-CME suite. Runs land in
out/study/<run>/; a finished run is not run again, so an interrupted study continues where it
stopped. The tables, the charts and the comparisons are printed and written to out/study/report.md
(PNG charts as well when matplotlib happens to be installed). Any other --key=value is passed to
every run (e.g. --device=cuda, or another suite's data_dir, eval_dir, tokenizer and init_from).
"""
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import data
import train

OPTIONS = dict(seeds=3, steps=500, workers=2, out="out/study", report=False, runs="")
COMMON = dict(eval_limit=0, log_interval=10, learning_rate=2e-3, targets="w1,w2,w3", r=32, experts=4, alpha=32.0)

# run name -> (label, train.py settings). One base, one data order per seed, the paper's FFN
# targets, and the same learning rate and alpha for every adapter; r_A = 32 split into k = 4 experts.
RUNS = {
    "full": ("Full fine-tuning", dict(adapter="none", learning_rate=5e-4)),
    "lora8": ("LoRA r=8", dict(adapter="lora", r=8)),
    "lora32": ("LoRA r=32", dict(adapter="lora")),
    "moelora": ("MoELoRA 4x8", dict(adapter="moelora")),
    "moelora_comp": ("MoELoRA 4x8 + competition", dict(adapter="moelora", competition=True)),
    "hydralora": ("HydraLoRA A12, 4 heads", dict(adapter="hydralora", r=12)),  # r=12: about TeamLoRA's count
    "teamlora_nocomp": ("TeamLoRA w/o competition", dict(adapter="teamlora", competition=False)),
    "teamlora": ("TeamLoRA 4x8", dict(adapter="teamlora")),
    "teamlora_k2": ("TeamLoRA k=2 (2x16)", dict(adapter="teamlora", experts=2)),
    "teamlora_k8": ("TeamLoRA k=8 (8x4)", dict(adapter="teamlora", experts=8)),
    "teamlora_bal0": ("balance_coef=0", dict(adapter="teamlora", balance_coef=0.0)),
    "teamlora_balsum": ("official: sum, weight 1", dict(adapter="teamlora", balance_coef=1.0, balance_reduction="sum")),
}
# the tables: title -> [(row label, run name)]
TABLES = {
    "Methods at matched parameters (the paper's Table 2)": [
        ("Full fine-tuning (reference)", "full"), ("LoRA r=8", "lora8"), ("LoRA r=32", "lora32"),
        ("MoELoRA 4x8", "moelora"), ("HydraLoRA A12, 4 heads", "hydralora"), ("TeamLoRA 4x8", "teamlora")],
    "Ablation (the paper's Table 4)": [
        ("neither (= MoELoRA)", "moelora"), ("competition only", "moelora_comp"),
        ("collaboration only", "teamlora_nocomp"), ("both (= TeamLoRA)", "teamlora")],
    "Number of experts at r_A = 32 (the paper's Figure 3a)": [
        ("k=1 (= LoRA r=32)", "lora32"), ("k=2", "teamlora_k2"), ("k=4", "teamlora"), ("k=8", "teamlora_k8")],
    "Load-balancing loss": [
        ("off (balance_coef=0)", "teamlora_bal0"), ("default (0.01, mean over layers)", "teamlora"),
        ("official (1.0, sum over layers)", "teamlora_balsum")],
}
CURVES = {"lora32": "L", "moelora": "M", "hydralora": "H", "teamlora": "T", "full": "F"}  # Figure 4b: run -> mark


def parse(argv):
    """(study options, train.py flags, run names) from --key=value arguments, read as train.py reads them."""
    opts, extra = dict(OPTIONS), []
    for arg in argv:
        key, value = train.parse_flag("--report=True" if arg == "--report" else arg)
        if key in OPTIONS:
            opts[key] = train.typed(key, value, OPTIONS, f"flag {arg}")
        else:
            extra.append(arg)  # a train.py key: checked by train.parse_config below
    names = [n for n in opts["runs"].split(",") if n] or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise data.UserError(f"unknown run(s) {', '.join(unknown)}; runs are: {', '.join(RUNS)}.")
    if opts["seeds"] < 1 or opts["steps"] < 1 or opts["workers"] < 1:
        raise data.UserError("seeds, steps and workers must be positive.")
    return opts, extra, names


def run_flags(name, seed, opts, extra):
    settings = {**COMMON, **RUNS[name][1], "seed": seed, "max_iters": opts["steps"], "eval_interval": opts["steps"],
                "out_dir": os.path.join(opts["out"], f"{name}-seed{seed}")}
    return [f"--{k}={v}" for k, v in settings.items()] + extra


def launch(name, seed, opts, extra, threads):
    """One run in its own process (one thread budget each); returns its results or raises."""
    flags = run_flags(name, seed, opts, extra)
    out = os.path.join(opts["out"], f"{name}-seed{seed}")
    if os.path.isfile(os.path.join(out, "results.json")):
        return name, seed, "done before"
    if os.path.isfile(os.path.join(out, "ckpt.pt")):  # stopped by Ctrl-C: continue it exactly
        flags.append("--init_from=resume")
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    t = time.time()
    with open(os.path.join(out, "stdout.txt"), "w") as log:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
        p = subprocess.run([sys.executable, script] + flags,
                           stdout=log, stderr=subprocess.STDOUT, env=env)
    if p.returncode:
        with open(os.path.join(out, "stdout.txt")) as f:
            tail = f.read().strip().splitlines()[-1:]
        raise data.UserError(f"run {name} (seed {seed}) failed: {tail[0] if tail else 'no output'}; "
                              f"its log is {out}/stdout.txt, and the study continues from it when rerun.")
    return name, seed, f"{time.time() - t:.0f} s"


def load(opts, names):
    """run name -> list of results dicts (one per finished seed), with the loss log."""
    out = {}
    for name in names:
        for seed in range(1, opts["seeds"] + 1):
            folder = os.path.join(opts["out"], f"{name}-seed{seed}")
            if not os.path.isfile(os.path.join(folder, "results.json")):
                continue
            with open(os.path.join(folder, "results.json")) as f:
                res = json.load(f)
            with open(os.path.join(folder, "log.jsonl")) as f:
                res["curve"] = [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
            out.setdefault(name, []).append(res)
    return out


def mean_std(values):
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def fmt(values):
    m, s = mean_std(values)
    return f"{m:.1f}±{s:.1f}" if len(values) > 1 else f"{m:.1f}"


def table(title, rows, results, tasks):
    lines = [f"### {title}", "", "| " + " | ".join(["method", "Params%"] + tasks + ["average", "train s"]) + " |",
             "|" + "---|" * (len(tasks) + 4)]
    for label, name in rows:
        runs = results.get(name)
        if not runs:
            lines.append(f"| {label} | (not run) |" + " |" * (len(tasks) + 2))
            continue
        pct = 100 * runs[0]["trainable_params"] / runs[0]["base_params"]
        cells = [fmt([r["scores"][t] for r in runs]) for t in tasks]
        avg = fmt([sum(r["scores"].values()) / len(r["scores"]) for r in runs])
        secs = fmt([r["train_seconds"] for r in runs])
        lines.append(f"| {label} | {pct:.2f} | " + " | ".join(cells) + f" | **{avg}** | {secs} |")
    return lines


def comparisons(results):
    """TeamLoRA against each other row: the difference of the mean averages and whether it
    exceeds twice its standard error over seeds (a rough Welch bound, n = seeds)."""
    base = results.get("teamlora")
    if not base or len(base) < 2:
        return ["(comparisons need at least 2 seeds of TeamLoRA)"]
    avg = lambda runs: [sum(r["scores"].values()) / len(r["scores"]) for r in runs]
    tm, ts = mean_std(avg(base))
    lines = ["| TeamLoRA minus | difference | 2 x standard error | verdict |", "|---|---|---|---|"]
    for name, runs in results.items():
        if name == "teamlora" or len(runs) < 2:
            continue
        m, s = mean_std(avg(runs))
        se = math.sqrt(ts ** 2 / len(base) + s ** 2 / len(runs))
        verdict = "exceeds the seed spread" if abs(tm - m) > 2 * se else "within the seed spread"
        lines.append(f"| {RUNS[name][0]} | {tm - m:+.1f} | {2 * se:.1f} | {verdict} |")
    return lines


def mean_curve(results, name):
    """(steps, training loss averaged over the seeds) of a run, or None if it has no log."""
    runs = [r["curve"] for r in results.get(name, []) if r["curve"]]
    if not runs:
        return None
    n = min(len(c) for c in runs)
    return [runs[0][i][0] for i in range(n)], [sum(c[i][1] for c in runs) / len(runs) for i in range(n)]


def mean_loads(results, name):
    """(number of seeds, task -> expert shares averaged over the seeds) of a run, or None."""
    runs = [r for r in results.get(name, []) if r.get("expert_load")]
    if not runs:
        return None
    return len(runs), {t: [sum(r["expert_load"][t][i] for r in runs) / len(runs) for i in range(len(load))]
                       for t, load in sorted(runs[0]["expert_load"].items())}


def loss_chart(results, width=64, height=14):
    """Training loss (mean over seeds, smoothed over 5 logged points) against step, in text."""
    series = {}
    for name in CURVES:
        curve = mean_curve(results, name)
        if curve:
            steps, mean = curve
            window = [mean[max(0, i - 4):i + 1] for i in range(len(mean))]
            series[name] = (steps, [sum(w) / len(w) for w in window])
    if not series:
        return []
    top = max(max(v) for _, v in series.values())
    low = min(min(v) for _, v in series.values())
    last = max(s[-1] for s, _ in series.values())
    grid = [[" "] * width for _ in range(height)]
    for name, (steps, values) in series.items():
        for s, v in zip(steps, values):
            x = min(width - 1, int((s / last) * (width - 1)))
            y = min(height - 1, int((top - v) / max(top - low, 1e-9) * (height - 1)))
            grid[y][x] = CURVES[name]
    lines = [f"{top - (top - low) * i / (height - 1):6.2f} |" + "".join(row) for i, row in enumerate(grid)]
    lines.append(" " * 7 + "+" + "-" * width)
    lines.append(" " * 8 + f"step 0{' ' * (width - 12)}{last:>6}")
    lines += [f"  {CURVES[n]} = {RUNS[n][0]}: {v[-1]:.2f} at the end" for n, (_, v) in series.items()]
    lines.append("  (a later letter hides an earlier one where two curves share a cell; loss.png, written when "
                 "matplotlib is installed, shows every curve)")
    return lines


def load_chart(results, name="teamlora"):
    """Each task's mean expert share (last layers, mean over seeds): the paper's Figure 5."""
    loads = mean_loads(results, name)
    if not loads:
        return []
    seeds, per_task = loads
    k = len(next(iter(per_task.values())))
    lines = [f"expert load of {RUNS[name][0]} over each task's prompt tokens (last 2 layers, mean of {seeds} "
             f"seed(s); even = {1 / k:.2f})"]
    for t, load in per_task.items():
        lines.append(f"{t:<11}" + "  ".join(f"e{i} {'█' * round(v * 40):<16}{v:.3f}" for i, v in enumerate(load)))
    return lines


def pngs(results, out):
    """loss.png and expert_load.png when matplotlib is installed (never required); the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in CURVES:
        curve = mean_curve(results, name)
        if curve:
            ax.plot(*curve, label=RUNS[name][0])
    ax.set(xlabel="step", ylabel="training loss (mean over seeds)", yscale="log")
    ax.legend()
    fig.tight_layout()
    written.append(os.path.join(out, "loss.png"))
    fig.savefig(written[-1], dpi=120)
    loads = mean_loads(results, "teamlora")
    if loads:
        fig, ax = plt.subplots(figsize=(5, 4))
        im = ax.imshow(list(loads[1].values()), cmap="viridis")
        ax.set(yticks=range(len(loads[1])), yticklabels=list(loads[1]), xlabel="expert", title="TeamLoRA expert load")
        fig.colorbar(im)
        fig.tight_layout()
        written.append(os.path.join(out, "expert_load.png"))
        fig.savefig(written[-1], dpi=120)
    return written


def report(opts, names):
    results = load(opts, names)
    if not results:
        raise data.UserError(f"no finished runs in {opts['out']}; run python study.py first.")
    tasks = sorted(next(iter(results.values()))[0]["scores"])
    lines = [f"## mini-CME study: {opts['steps']} steps, seeds 1..{opts['seeds']}, "
             "scores in % (mean±std over seeds)", ""]
    for title, rows in TABLES.items():
        lines += table(title, rows, results, tasks) + [""]
    lines += ["### Differences against TeamLoRA (average score)", ""] + comparisons(results) + [""]
    chart, loads = loss_chart(results), load_chart(results)
    lines += ["### Training loss (the paper's Figure 4b)", "", "```"] + chart + ["```", ""]
    lines += ["### Expert load (the paper's Figure 5)", "", "```"] + loads + ["```"]
    text = "\n".join(lines) + "\n"
    print(text)
    data.write_atomic(os.path.join(opts["out"], "report.md"), text)
    for p in pngs(results, opts["out"]):
        print(f"wrote {p}")
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return None
    try:
        opts, extra, names = parse(argv)
        cfg = train.parse_config(extra)  # checks the extra keys once, before anything runs
        if not opts["report"]:
            train.build_demo(cfg)  # the suite, its shards and the base, when the demo defaults are used
            jobs = [(n, s) for s in range(1, opts["seeds"] + 1) for n in names]
            threads = max(1, (os.cpu_count() or 1) // opts["workers"])
            print(f"{len(jobs)} runs ({len(names)} configurations x {opts['seeds']} seeds), "
                  f"{opts['workers']} at a time, "
                  f"{threads} thread(s) each; results in {opts['out']}/", flush=True)
            start = time.time()
            pool = ThreadPoolExecutor(opts["workers"])
            try:
                for i, (name, seed, how) in enumerate(pool.map(lambda j: launch(*j, opts, extra, threads), jobs)):
                    minutes = (time.time() - start) / 60
                    print(f"[{i + 1}/{len(jobs)}] {name} seed {seed}: {how} ({minutes:.1f} min so far)",
                          flush=True)
            finally:
                pool.shutdown(cancel_futures=True)  # after a failure or Ctrl-C, start nothing new
        return report(opts, names)
    except data.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
