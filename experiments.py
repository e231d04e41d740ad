"""The lab beside the reference: arms over seeds and regimes, paired intervals, tables, controls.

    python experiments.py compare --out-dir results/compare-llama --tiny-arch llama
                                              # 3 arms x 2 regimes (H = 0, 2) x 5 seeds: 30 runs
    python experiments.py between results/compare-gpt2 results/compare-llama   # same runs, 2 models
    python experiments.py plot results/compare-llama          # compare.png (needs matplotlib)
    python experiments.py self-check-control results/compare-llama   # verdict vs a coin
    python experiments.py probe-baselines results/default     # what the coupling probe reads
    python experiments.py label-noise results/default         # advantage labels vs the oracle
    python experiments.py bump-memory results/compare-llama  # what memory of bumps is worth
    python experiments.py rollout-speed [old/grpo_agentic.py]  # decisions/s at H = 0, 2, longest

`compare` trains every arm in every regime on every seed with the same budget. Arms (--arms):
GRPO, GRPO + the actor's own classification (GCD) with oracle labels, GiGPO (and GCD with
advantage labels, on request). Regimes (--histories): the --history of every arm. A seed fixes the
initialisation, the rollouts and the layouts (train and held-out sets are drawn with the seed as
their data seed), so the arms of one regime and seed share everything up to the warm start, which
is made once per regime and seed and reused. Differences between arms are paired by seed within a
regime, and differences between regimes by arm and seed, with 95 % Student-t intervals. The flags
of grpo_agentic.py apply to every run (e.g. --iters 50, --tiny-arch llama), except those the
comparison sets per run (--seed, --data-seed, --history, --cls-coef, --cls-labels,
--step-credit-coef, --self-check): use --seeds, --histories, --gcd-coef, --gigpo-coef,
--self-check-tries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

import grpo_agentic as ga
import toy_env

# ---- Statistics ---------------------------------------------------------------------------------


def student_t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom, by bisection on its
    CDF, which is integrated numerically (Simpson's rule) from the density

        f(t) = c * (1 + t^2 / df)^(-(df + 1) / 2),
        c    = Gamma((df + 1) / 2) / (sqrt(df * pi) * Gamma(df / 2))

    >>> round(student_t_quantile(0.975, 4), 3), round(student_t_quantile(0.975, 10), 3)
    (2.776, 2.228)
    """
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 4001)  # an even number of intervals for Simpson's rule
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(t**2 / df))
        h = x / 4000
        integral = h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum())
        integral += h / 3 * 2 * density[2:-1:2].sum()
        return 0.5 + integral

    low, high = 0.0, 1000.0
    for _ in range(60):
        middle = (low + high) / 2
        if cdf(middle) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-seed paired differences and its 95 % t-interval,

        mean +- t_{0.975, n-1} * sd(diffs, ddof=1) / sqrt(n)

    >>> [round(x, 3) for x in paired_interval([0.1, 0.2, 0.3])]
    [0.2, -0.048, 0.448]
    """
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float(d.mean()), math.nan, math.nan
    half = student_t_quantile(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def show_interval(diffs: list[float]) -> str:
    mean, low, high = paired_interval(diffs)
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


# ---- The comparison -----------------------------------------------------------------------------
ARMS = ("grpo", "grpo+cls-advantage", "grpo+cls-oracle", "gigpo")  # "grpo" is the baseline
SET_PER_ARM = (
    "seed",
    "data_seed",
    "cls_coef",
    "cls_labels",
    "step_credit_coef",
    "self_check",
    "history",
)
NOT_PART_OF_A_RUN = ("out_dir", "overwrite", "device")  # where and how, not what
WARM_START_FIELDS = (  # everything the supervised warm-up depends on
    "seed",
    "data_seed",
    "train_tasks",
    "sft_steps",
    "sft_lr",
    "sft_batch",
    "model",
    "tiny_arch",
    "tiny_layers",
    "tiny_dim",
    "max_action_tokens",
    "history",
)
CREDIT = ("adv_flawed_mean", "adv_abs_mean", "adv_flawed_rel", "flawed_pos_adv_frac")
CHAIN = (
    "cls_bacc_train",
    "cls_bacc_held_out",
    "cls_bacc_after_bump",
    "hidden_cos",
    "hidden_cos_move",
    "hidden_cos_centred",
    "coupling_cos",
    "coupling_ratio",
    "p_flawed",
)
SUCCESS = ("eval_train_success", "eval_held_out_success", "eval_held_out_success_self_check")
ANATOMY = tuple(f"fail_{kind}" for kind in ga.FAILURE_KINDS) + (
    "repeat_after_bump",
    "p_repeat_bump",
)
TABLES = (  # (title, metrics, with GRPO's own change from start to end as a yardstick?)
    ("Credit: what the advantage says about flawed moves (over all iterations)", CREDIT, False),
    ("The chain, link by link (end of training)", CHAIN, True),
    ("Success, greedy, and with the self-check (end of training)", SUCCESS, True),
    ("How held-out episodes fail, and recovery after a bump (end of training)", ANATOMY, True),
)
BETWEEN = SUCCESS[:2] + ANATOMY + CHAIN  # compared between regimes, arm by arm


@dataclass
class Lab:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "seeds"})
    arms: list[str] = field(
        default_factory=lambda: ["grpo", "grpo+cls-oracle", "gigpo"],
        metadata={"help": f"arms, 'grpo' first (the baseline); any of {', '.join(ARMS)}"},
    )
    histories: list[int] = field(
        default_factory=lambda: [0, 2],
        metadata={"help": "regimes: --history of every arm; differences to the first are paired"},
    )
    workers: int = field(default=2, metadata={"help": "runs at once, each in its own process"})
    gcd_coef: float = field(default=0.5, metadata={"help": "--cls-coef of the two GCD arms"})
    gigpo_coef: float = field(default=1.0, metadata={"help": "--step-credit-coef of GiGPO"})
    self_check_tries: int = field(default=3, metadata={"help": "K of every arm's self-check"})
    resume: bool = field(
        default=False,
        metadata={"help": "go on with an --out-dir that holds runs: finished ones are read back"},
    )

    def __post_init__(self):
        distinct = len(set(self.seeds)) == len(self.seeds)
        if not self.seeds or any(x < 0 for x in self.seeds) or not distinct:
            raise ValueError(f"--seeds must be distinct integers >= 0, got {self.seeds}")
        known = all(arm in ARMS for arm in self.arms) and len(set(self.arms)) == len(self.arms)
        if not self.arms or self.arms[0] != "grpo" or not known:
            raise ValueError(f"--arms must be distinct arms of {ARMS}, 'grpo' first")
        regimes = self.histories
        if not regimes or any(h < 0 for h in regimes) or len(set(regimes)) != len(regimes):
            raise ValueError(f"--histories must be distinct integers >= 0, got {regimes}")
        if self.workers < 1 or self.self_check_tries < 1:
            raise ValueError("--workers and --self-check-tries must be >= 1")
        if not (self.gcd_coef > 0 and self.gigpo_coef > 0):
            raise ValueError("--gcd-coef and --gigpo-coef must be > 0")


def arm_settings(arm: str, lab: Lab) -> dict:
    """What makes an arm, on top of the settings every arm shares."""
    gcd = {"cls_coef": lab.gcd_coef}
    return {
        "grpo": {},
        "grpo+cls-advantage": {**gcd, "cls_labels": "advantage"},
        "grpo+cls-oracle": {**gcd, "cls_labels": "oracle"},
        "gigpo": {"step_credit_coef": lab.gigpo_coef},
    }[arm]


def run_name(arm: str, history: int, seed: int) -> str:
    return f"{arm}-h{history}-seed{seed}"


def job_settings(
    s: ga.Settings, lab: Lab, arm: str, history: int, seed: int, out_dir: str
) -> ga.Settings:
    """The settings of one (arm, history, seed) run: the seed also draws the layouts."""
    return dataclasses.replace(
        s,
        seed=seed,
        data_seed=seed,
        history=history,
        self_check=lab.self_check_tries,
        render_every=0,
        out_dir=os.path.join(out_dir, run_name(arm, history, seed)),
        **arm_settings(arm, lab),
    )


def check_shared(s: ga.Settings) -> None:
    """The comparison sets these per arm and seed; a flag for them would be silently ignored."""
    for f in dataclasses.fields(ga.Settings):
        if f.name in SET_PER_ARM and getattr(s, f.name) != f.default:
            flag = f.name.replace("_", "-")
            raise ValueError(
                f"--{flag} is set per arm by the comparison; use --seeds, --histories, "
                "--gcd-coef, --gigpo-coef or --self-check-tries"
            )


def outcome_fields(settings: dict, keep: tuple | None = None) -> dict:
    """The fields of a settings dict that decide a run's outcome (or only those in `keep`)."""
    return {
        k: v
        for k, v in settings.items()
        if k not in NOT_PART_OF_A_RUN and (keep is None or k in keep)
    }


def differences(wanted: dict, found: dict) -> str:
    keys = sorted(set(wanted) | set(found))
    return ", ".join(
        f"{k} {wanted.get(k)!r} here, {found.get(k)!r} there"
        for k in keys
        if wanted.get(k) != found.get(k)
    )


def check_existing(jobs: list[ga.Settings], warm_paths: dict[tuple, str]) -> None:
    """Refuse to resume from finished runs or warm starts made with other settings."""
    for job in jobs:
        if os.path.exists(os.path.join(job.out_dir, "summary.json")):
            with open(os.path.join(job.out_dir, "settings.json")) as f:
                found = outcome_fields(json.load(f))
            wanted = outcome_fields(json.loads(json.dumps(dataclasses.asdict(job))))
            if found != wanted:
                raise ValueError(
                    f"{job.out_dir} was made with other settings ({differences(wanted, found)}); "
                    "choose another --out-dir or delete that run"
                )
    for job in jobs:
        warm_path = warm_paths[job.history, job.seed]
        if os.path.exists(warm_path):
            made_with = torch.load(warm_path, map_location="cpu").get("settings") or {}
            found = outcome_fields(made_with, WARM_START_FIELDS)
            wanted = outcome_fields(dataclasses.asdict(job), WARM_START_FIELDS)
            if found != wanted:
                raise ValueError(
                    f"{warm_path} was made with other settings ({differences(wanted, found)}); "
                    "choose another --out-dir or delete it"
                )


def compare_job(job: tuple[ga.Settings, str, int]) -> dict:
    """One (arm, history, seed) run, in a worker process with its share of the CPU threads, from
    the warm start of its history and seed (made by the first of its arms to start). A finished run
    is read back."""
    s, warm_path, workers = job
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    summary_path = os.path.join(s.out_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return json.load(f)
    device = ga.resolve_device(s.device)
    if not os.path.exists(warm_path):
        model, tokenizer = ga.load_policy(s, device)
        start = ga.warm_start(model.eval(), tokenizer, s, log=lambda line: None)
        start["settings"] = dataclasses.asdict(s)
        partial = f"{warm_path}.{os.getpid()}"
        torch.save(start, partial)
        os.replace(partial, warm_path)  # whole or absent, even if stopped or made twice at once
    start = torch.load(warm_path, map_location=device)  # a warm start from CUDA resumes on CPU
    return ga.run(s, s.out_dir, lambda line: None, start)


def end_values(summary: dict) -> dict:
    """The numbers a table reads from one run: its end, and its credit over the run."""
    over_run = summary["over_run"]
    values = {**summary["end"], **over_run}
    scale = over_run["adv_abs_mean"]  # mean |A|: 0 when no move had any credit
    values["adv_flawed_rel"] = over_run["adv_flawed_mean"] / scale if scale else math.nan
    return values


def tables(end: dict, start: dict, seeds: list[int], arms: list[str]) -> str:
    """One regime's tables: for each table, each arm's mean over seeds, then paired differences.
    `end` and `start` are keyed by (arm, seed)."""
    others = arms[1:]
    out = []
    for title, keys, with_own_change in TABLES:
        out += [f"### {title}", "", "| metric | " + " | ".join(arms) + " |"]
        out.append("|---" * (len(arms) + 1) + "|")
        for key in keys:
            means = [np.mean([end[arm, x][key] for x in seeds]) for arm in arms]
            out.append(f"| {key} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
        columns = [f"{arm} - grpo" for arm in others]
        if with_own_change:
            columns.append("grpo: end - start")
        if not columns:  # GRPO alone, and nothing to compare it with
            out.append("")
            continue
        out += ["", "| paired difference | " + " | ".join(columns) + " |"]
        out.append("|---" * (len(columns) + 1) + "|")
        for key in keys:
            cells = []
            for arm in others:
                cells.append(show_interval([end[arm, x][key] - end["grpo", x][key] for x in seeds]))
            if with_own_change and all(key in start["grpo", x] for x in seeds):
                own = [end["grpo", x][key] - start["grpo", x][key] for x in seeds]
                cells.append(show_interval(own))
            elif with_own_change:
                cells.append("not measured at the start")
            out.append(f"| {key} | " + " | ".join(cells) + " |")
        out.append("")
    out.append(
        f"Seeds {' '.join(map(str, seeds))}, each with its own layouts (data seed = seed); "
        "means over seeds; differences paired by seed, mean [95 % t-interval]."
    )
    return "\n".join(out) + "\n"


def between_regimes(end: dict, seeds: list[int], arms: list[str], histories: list[int]) -> str:
    """Each arm with history H against the same arm and seed in the first regime (H = 0 here):
    paired differences of BETWEEN. `end` is keyed by (arm, history, seed)."""
    base = histories[0]
    columns = [f"{arm}: h{h} - h{base}" for h in histories[1:] for arm in arms]
    out = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in BETWEEN:
        cells = [
            show_interval([end[arm, h, x][key] - end[arm, base, x][key] for x in seeds])
            for h in histories[1:]
            for arm in arms
        ]
        out.append(f"| {key} | " + " | ".join(cells) + " |")
    out.append("\nSame arm, same seed, same layouts; mean [95 % t-interval] of the differences.")
    return "\n".join(out) + "\n"


def compare(s: ga.Settings, lab: Lab, out_dir: str) -> str:
    """Every arm in every regime on every seed, `lab.workers` runs at a time; writes and returns
    compare.md."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    check_shared(s)
    keys = [  # regime by regime, arm by arm: the warm starts come first
        (arm, h, seed) for h in lab.histories for arm in lab.arms for seed in lab.seeds
    ]
    jobs = [job_settings(s, lab, arm, h, seed, out_dir) for arm, h, seed in keys]
    warm_paths = {
        (h, x): os.path.join(out_dir, f"warm-start-h{h}-seed{x}.pt")
        for h in lab.histories
        for x in lab.seeds
    }
    started = os.path.isdir(out_dir) and any(
        name.startswith(ARMS) or name.startswith("warm-start") for name in os.listdir(out_dir)
    )
    if started and not lab.resume:
        raise ValueError(
            f"{out_dir} already holds runs of a comparison; pass --resume to go on with it "
            "(finished runs with the same settings are read back, not repeated)"
        )
    check_existing(jobs, warm_paths)
    os.makedirs(out_dir, exist_ok=True)
    end, start = {}, {}
    work = [(job, warm_paths[job.history, job.seed], lab.workers) for job in jobs]
    with ProcessPoolExecutor(lab.workers, mp_context=get_context("spawn")) as pool:  # no fork
        for key, summary in zip(keys, pool.map(compare_job, work)):
            end[key] = end_values(summary)
            start[key] = summary["start"]
            shown = ", ".join(f"{k} {end[key][k]:.3f}" for k in SUCCESS)
            print(f"{run_name(*key)}: {shown}", flush=True)
    parts = []
    for h in lab.histories:
        regime_end = {(arm, x): end[arm, hh, x] for arm, hh, x in keys if hh == h}
        regime_start = {(arm, x): start[arm, hh, x] for arm, hh, x in keys if hh == h}
        parts.append(
            f"## History H = {h}\n\n" + tables(regime_end, regime_start, lab.seeds, lab.arms)
        )
    if len(lab.histories) > 1:
        parts.append(
            "## Between regimes\n\n" + between_regimes(end, lab.seeds, lab.arms, lab.histories)
        )
    table = "\n".join(parts)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(table)
    return table


def between_dirs(dir_a: str, dir_b: str) -> str:
    """Runs of the same name in two comparisons (say, two tiny models): B - A for each arm and
    regime, paired by seed, over SUCCESS[:2], ANATOMY and CHAIN."""
    names = [
        d
        for d in sorted(os.listdir(dir_a))
        if os.path.exists(summary_path(dir_a, d)) and os.path.exists(summary_path(dir_b, d))
    ]
    if not names:
        raise ValueError(f"{dir_a} and {dir_b} have no finished run of the same name")
    groups = list(dict.fromkeys(d.rsplit("-seed", 1)[0] for d in names))

    def read(directory, name):
        with open(summary_path(directory, name)) as f:
            return end_values(json.load(f))

    out = [
        f"B = {dir_b}, A = {dir_a}",
        "",
        "| metric | " + " | ".join(f"{g}: A | B | B - A" for g in groups) + " |",
        "|---" * (3 * len(groups) + 1) + "|",
    ]
    for key in BETWEEN:
        cells = []
        for g in groups:
            runs = [d for d in names if d.rsplit("-seed", 1)[0] == g]
            a = [read(dir_a, d)[key] for d in runs]
            b = [read(dir_b, d)[key] for d in runs]
            diff = show_interval([y - x for x, y in zip(a, b)])
            cells.append(f"{np.mean(a):.3f} | {np.mean(b):.3f} | {diff}")
        out.append(f"| {key} | " + " | ".join(cells) + " |")
    seeds = {
        g: [d.rsplit("-seed", 1)[1] for d in names if d.rsplit("-seed", 1)[0] == g] for g in groups
    }
    shown = "; ".join(f"{g}: {' '.join(sorted(x, key=int))}" for g, x in seeds.items())
    out.append(f"\nSeeds ({shown}); paired by run name; mean [95 % t-interval].")
    return "\n".join(out) + "\n"


def plot(out_dir: str) -> str:
    """compare.png: the chain over training (iteration 0: after the warm-up), mean over seeds."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plot needs matplotlib (not a run-time dependency): pip install matplotlib"
        )
    keys = ("cls_bacc_held_out", "hidden_cos_centred", "coupling_cos", "eval_held_out_success")
    fig, axes = plt.subplots(1, len(keys), figsize=(17, 3.8))
    finished = [d for d in sorted(os.listdir(out_dir)) if os.path.exists(summary_path(out_dir, d))]
    for arm in sorted({d.rsplit("-seed", 1)[0] for d in finished}):
        curves = []
        for d in (d for d in finished if d.rsplit("-seed", 1)[0] == arm):
            with open(summary_path(out_dir, d)) as f:
                curve = [{"iter": 0, **json.load(f)["start"]}]
            with open(os.path.join(out_dir, d, "metrics.jsonl")) as f:
                curve += [row for row in map(json.loads, f) if "coupling_cos" in row]  # measured
            curves.append(curve)
        for ax, key in zip(axes, keys):
            mean = np.mean([[row[key] for row in curve] for curve in curves], axis=0)
            label = f"{arm} ({len(curves)} seeds)"
            ax.plot([row["iter"] for row in curves[0]], mean, marker="o", label=label)
            ax.set_xlabel("GRPO iteration")
            ax.set_title(key)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "compare.png")
    fig.savefig(path, dpi=110)
    return path


def summary_path(out_dir: str, run: str) -> str:
    return os.path.join(out_dir, run, "summary.json")


# ---- Controls and baselines on saved runs -------------------------------------------------------
def settings_of(run_dir: str) -> ga.Settings:
    """The Settings a run was made with, read from its settings.json."""
    with open(os.path.join(run_dir, "settings.json")) as f:
        saved = json.load(f)
    known = {f.name for f in dataclasses.fields(ga.Settings)}
    saved["device"] = "cpu"  # analysed here, wherever it was trained
    return ga.Settings(**{k: v for k, v in saved.items() if k in known})


def saved_policy(run_dir: str):
    """(model in eval mode, tokenizer, settings) of a finished run, on the CPU."""
    s = settings_of(run_dir)
    policy = dataclasses.replace(s, model=os.path.join(run_dir, "policy"))
    model, tokenizer = ga.load_policy(policy, torch.device("cpu"))
    return model.eval(), tokenizer, s


@torch.no_grad()
def held_out_success(model, tokenizer, s: ga.Settings, judge=None, tries: int = 0) -> float:
    """Greedy success on the run's held-out layouts, seeded as ga.evaluate seeds it."""
    generator = torch.Generator().manual_seed(s.seed)
    layouts = ga.task_sets(s)[1]["held_out"]
    _, rewards, _ = ga.rollout(
        model,
        tokenizer,
        layouts,
        1,
        s.max_action_tokens,
        s.temperature,
        greedy=True,
        generator=generator,
        judge=judge,
        tries=tries,
        history=s.history,
    )
    return rewards.mean().item()


def self_check_control(run_dir: str) -> dict:
    """Held-out success three ways: plain greedy; the self-check (the verdict rejects, the move is
    resampled up to K times); and the same resampling decided by a coin that rejects at the
    verdict's own rate -- as much resampling, no judgement in it."""
    model, tokenizer, s = saved_policy(run_dir)
    counts = {"judged": 0, "rejected": 0}

    def verdict(prompts, actions):
        ok = ga.verdict_is_good(model, tokenizer, prompts, actions).tolist()
        counts["judged"] += len(ok)
        counts["rejected"] += ok.count(False)
        return ok

    out = {"none": held_out_success(model, tokenizer, s)}
    out["verdict"] = held_out_success(model, tokenizer, s, verdict, s.self_check)
    out["reject_rate"] = counts["rejected"] / max(counts["judged"], 1)
    coin = np.random.default_rng(s.seed)

    def coin_judge(prompts, actions):
        return (coin.random(len(prompts)) >= out["reject_rate"]).tolist()

    out["random"] = held_out_success(model, tokenizer, s, coin_judge, s.self_check)
    return out


def self_check_control_table(compare_dir: str) -> str:
    runs = [
        d for d in sorted(os.listdir(compare_dir)) if os.path.exists(summary_path(compare_dir, d))
    ]
    results = {}
    for d in runs:
        results[d] = self_check_control(os.path.join(compare_dir, d))
        print(f"{d}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[d].items()), flush=True)
    lines = [
        "| arm | verdict rejects | none | verdict | coin (same rate) "
        "| verdict - none | coin - none | verdict - coin |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in dict.fromkeys(d.rsplit("-seed", 1)[0] for d in runs):
        rs = [r for d, r in results.items() if d.rsplit("-seed", 1)[0] == arm]

        def mean(key):
            return np.mean([r[key] for r in rs])

        def diff(a, b):
            return show_interval([r[a] - r[b] for r in rs])

        lines.append(
            f"| {arm} | {mean('reject_rate'):.0%} | {mean('none'):.3f} | {mean('verdict'):.3f} "
            f"| {mean('random'):.3f} | {diff('verdict', 'none')} | {diff('random', 'none')} "
            f"| {diff('verdict', 'random')} |"
        )
    lines.append(f"\n{len(rs)} seeds per arm; paired by seed, mean [95 % t-interval].")
    return "\n".join(lines)


def probe_rows(model, tokenizer, s: ga.Settings) -> dict:
    """The coupling probe on its coupled pairs, on unrelated pairs, and on another move."""

    def observation(layout):
        return toy_env.GridWorld.from_string(layout).observation()

    triples = toy_env.coupled_pairs("train", s.probe_pairs, s.data_seed)
    coupled = [(observation(g), observation(f), a) for g, f, a in triples]
    layouts = toy_env.sample_layouts("train", 2 * s.probe_pairs, seed=s.data_seed + 1)
    unrelated = [
        (observation(layouts[2 * k]), observation(layouts[2 * k + 1]), a)
        for k, (_, _, a) in enumerate(triples)
    ]
    rows = {
        "coupled": ga.coupling_probe(model, tokenizer, coupled),
        "unrelated": ga.coupling_probe(model, tokenizer, unrelated),
    }
    params = list(model.parameters())

    def grad(obs, action):
        logp = ga.action_logprobs(model, tokenizer, [obs], [action])[0]
        return torch.cat([g.flatten() for g in torch.autograd.grad(logp, params)])

    cosines = []
    for obs, _, action in coupled:
        other = next(a for a in toy_env.ACTIONS if a != action)
        cos = torch.nn.functional.cosine_similarity(grad(obs, action), grad(obs, other), dim=0)
        cosines.append(cos.item())
    rows["other move"] = {"coupling_cos": float(np.mean(cosines))}
    return rows


def probe_baselines(run_dir: str) -> str:
    """The probe at the start of RL (the run's warm-up, redone) and on the final policy."""
    s = settings_of(run_dir)
    model, tokenizer = ga.load_policy(dataclasses.replace(s, model=""), torch.device("cpu"))
    model.eval()
    ga.warm_start(model, tokenizer, s, log=lambda line: None)  # the run's policy at iteration 0
    start = probe_rows(model, tokenizer, s)
    final, tokenizer, _ = saved_policy(run_dir)
    end = probe_rows(final, tokenizer, s)
    lines = [
        "| pairs | coupling_cos start -> end | coupling_ratio start -> end "
        "| hidden_cos start -> end |",
        "|---|---|---|---|",
    ]
    for kind in start:
        cells = [
            f"{start[kind][k]:.3f} -> {end[kind][k]:.3f}" if k in start[kind] else "--"
            for k in ("coupling_cos", "coupling_ratio", "hidden_cos")
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def label_noise(run_dir: str, iters: int = 20) -> str:
    """How often the advantage labels (--cls-labels advantage) agree with the oracle, on `iters`
    iterations of rollouts of the run's final policy on its train layouts (no training)."""
    model, tokenizer, s = saved_policy(run_dir)
    pool, _ = ga.task_sets(s)
    rng = np.random.default_rng(s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    counts = np.zeros((2, 2), dtype=int)  # [label good?][oracle good?]
    for _ in range(iters):
        moves, rewards, _ = ga.sample_iteration(model, tokenizer, pool, s, rng, generator)
        advantages = ga.move_advantages(rewards, [m.episode for m in moves])
        for m, a in zip(moves, advantages.tolist()):
            if a != 0:
                counts[int(a > 0), int(m.good)] += 1
    n = counts.sum()
    episodes = f"{s.tasks_per_iter} x {s.group_size} episodes"
    return "\n".join(
        [
            f"{n} labelled moves from {iters} iterations of {episodes} ({run_dir}/policy)",
            f"label 'good' (A > 0): {counts[1].sum()} moves, "
            f"{counts[1, 1] / counts[1].sum():.0%} of them good by the oracle",
            f"label 'bad'  (A < 0): {counts[0].sum()} moves, "
            f"{counts[0, 0] / counts[0].sum():.0%} of them flawed by the oracle",
            f"disagreement with the oracle: {(counts[0, 1] + counts[1, 0]) / n:.1%}",
        ]
    )


@torch.no_grad()
def greedy_with_bump_memory(model, tokenizer, layouts: list[str], memory: bool) -> float:
    """Success of a Markov policy (history 0) taking, at each turn, its most likely of the four
    moves in the action format; with `memory`, the most likely among those that have not already
    bumped into a wall at this cell in this episode: perfect memory of that one fact."""
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    bumped = [set() for _ in envs]  # per episode: (cell, move) pairs that left the agent in place
    live = list(range(len(envs)))
    while live:
        observations = [envs[i].observation() for i in live for _ in toy_env.ACTIONS]
        moves = list(toy_env.ACTIONS) * len(live)
        logps = ga.action_logprobs(model, tokenizer, observations, moves).view(len(live), -1)
        for k, i in enumerate(live):
            cell = envs[i].pos
            ranked = [toy_env.ACTIONS[j] for j in logps[k].argsort(descending=True).tolist()]
            allowed = [m for m in ranked if not (memory and (cell, m) in bumped[i])]
            envs[i].step(allowed[0])
            if envs[i].pos == cell:
                bumped[i].add((cell, allowed[0]))
        live = [i for i in live if not envs[i].done]
    return float(np.mean([env.pos == env.goal for env in envs]))


def bump_memory(compare_dir: str) -> str:
    """The yardstick for history: each finished H = 0 GRPO policy of a comparison on its held-out
    layouts, without and with perfect memory of its bumps, beside the greedy success GRPO reached
    in each regime of the same seed (regimes finished for every such seed only)."""
    finished = {d for d in os.listdir(compare_dir) if os.path.exists(summary_path(compare_dir, d))}
    seeds = sorted(int(d.rsplit("-seed", 1)[1]) for d in finished if d.startswith("grpo-h0-seed"))
    if not seeds:
        raise ValueError(f"{compare_dir} holds no finished grpo-h0-seed* run")
    histories = sorted(
        int(d[len("grpo-h") :].split("-")[0]) for d in finished if d.startswith("grpo-h")
    )
    histories = [
        h
        for h in dict.fromkeys(histories)
        if all(run_name("grpo", h, x) in finished for x in seeds)
    ]
    rows = {}
    for seed in seeds:
        model, tokenizer, s = saved_policy(os.path.join(compare_dir, run_name("grpo", 0, seed)))
        layouts = ga.task_sets(s)[1]["held_out"]
        row = {
            "argmax": greedy_with_bump_memory(model, tokenizer, layouts, memory=False),
            "memory": greedy_with_bump_memory(model, tokenizer, layouts, memory=True),
        }
        for h in histories:
            with open(summary_path(compare_dir, run_name("grpo", h, seed))) as f:
                row[f"greedy h{h}"] = json.load(f)["eval_held_out_success"]
        rows[seed] = row
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    keys = list(rows[seeds[0]])
    means = [np.mean([r[k] for r in rows.values()]) for k in keys]
    lines = ["| held-out success | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines.append("| mean | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    gain = [r["memory"] - r["argmax"] for r in rows.values()]
    lines.append(f"\nmemory - argmax (what remembering bumps is worth): {show_interval(gain)}")
    for h in histories[1:]:
        learned = [r[f"greedy h{h}"] - r["greedy h0"] for r in rows.values()]
        lines.append(
            f"greedy h{h} - greedy h0 (history: its warm-up and RL): {show_interval(learned)}"
        )
    lines.append(f"\nSeeds {' '.join(map(str, seeds))}; paired by seed, mean [95 % t-interval].")
    return "\n".join(lines)


def rollout_speed(rounds: int = 9, other_file: str | None = None) -> str:
    """Decisions per second of `rollout` at H = 0, 2 and the longest H the budget allows, each on
    an untrained built-in tiny model sized for it (every episode runs its whole budget, so prompts
    reach their longest), 16 layouts x 8 episodes per rollout, 1 thread, the variants taking turns
    in one process so that a busy machine slows them alike; medians over `rounds`. With
    `other_file` (another version of grpo_agentic.py), its rollout at H = 0 on the same model takes
    turns too."""
    import importlib.util
    import statistics
    import time

    torch.set_num_threads(1)
    tokenizer = ga.build_word_tokenizer()
    s = ga.Settings()
    pool, eval_sets = ga.task_sets(s)
    layouts = pool + eval_sets["held_out"]
    longest = max(toy_env.GridWorld.from_string(x).max_steps for x in layouts) - 1
    variants = {}
    for h in dict.fromkeys((0, 2, longest)):
        torch.manual_seed(0)
        positions = ga.positions_for(dataclasses.replace(s, history=h), tokenizer)
        model = ga.build_tiny_model(tokenizer, s.tiny_layers, s.tiny_dim, positions, s.tiny_arch)
        model.eval()
        variants[f"H = {h}"] = (ga.rollout, model, {"history": h})
        if h == 0 and other_file:
            spec = importlib.util.spec_from_file_location("other_version", other_file)
            other = importlib.util.module_from_spec(spec)
            sys.modules["other_version"] = other  # dataclasses look their module up here
            spec.loader.exec_module(other)
            variants[f"H = 0, {other_file}"] = (other.rollout, model, {})
    rates = {name: [] for name in variants}
    rng = np.random.default_rng(0)
    for r in range(rounds):
        picked = [pool[k] for k in rng.choice(len(pool), size=16, replace=False)]
        for name, (play, model, history) in variants.items():
            generator = torch.Generator().manual_seed(r)
            t = time.perf_counter()
            moves, _, _ = play(model, tokenizer, picked, 8, 4, 1.0, generator=generator, **history)
            rates[name].append(len(moves) / (time.perf_counter() - t))
    lines = ["| rollout | decisions per second (median) | relative to H = 0 |", "|---|---|---|"]
    base = statistics.median(rates["H = 0"])
    for name, values in rates.items():
        rate = statistics.median(values)
        lines.append(f"| {name} | {rate:.0f} | {rate / base:.2f} |")
    lines.append(f"\n{rounds} rounds; the longest H the budget allows is {longest}.")
    return "\n".join(lines)


# ---- Command line -------------------------------------------------------------------------------
COMMANDS = (
    "compare",
    "between",
    "plot",
    "self-check-control",
    "probe-baselines",
    "label-noise",
    "bump-memory",
    "rollout-speed",
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python experiments.py {{{','.join(COMMANDS)}}} ...\n\n{__doc__}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per saved policy
    try:
        if command == "compare":
            parser = ga.HfArgumentParser((ga.Settings, Lab), prog="experiments.py compare")

            def one_line_error(message: str):
                parser.exit(2, f"experiments.py compare: error: {message}\n")

            parser.error = one_line_error
            try:
                s, lab = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)
            except ValueError as e:
                parser.error(str(e))
            if not s.out_dir:
                parser.error("--out-dir is required")
            print(compare(s, lab, s.out_dir))
        elif command == "rollout-speed":
            if len(rest) > 1 or (rest and not os.path.isfile(rest[0])):
                print("experiments.py rollout-speed: error: give at most one file", file=sys.stderr)
                return 2
            print(rollout_speed(9, rest[0] if rest else None))
        elif command == "between":
            if len(rest) != 2 or not all(os.path.isdir(d) for d in rest):
                print(
                    "experiments.py between: error: give two existing directories", file=sys.stderr
                )
                return 2
            print(between_dirs(*rest))
        elif len(rest) != 1 or not os.path.isdir(rest[0]):
            print(f"experiments.py {command}: error: give one existing directory", file=sys.stderr)
            return 2
        elif command == "plot":
            print(f"wrote {plot(rest[0])}")
        elif command == "self-check-control":
            print(self_check_control_table(rest[0]))
        elif command == "probe-baselines":
            print(probe_baselines(rest[0]))
        elif command == "bump-memory":
            print(bump_memory(rest[0]))
        else:
            print(label_noise(rest[0]))
    except (OSError, ValueError, ImportError) as e:
        print(f"experiments.py {command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
