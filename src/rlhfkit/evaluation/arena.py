"""``rlhfkit arena``: Elo and Bradley–Terry ratings with bootstrap intervals from battles.

Input: battles in Chatbot Arena's format, a JSON list or JSONL of
``{"model_a": str, "model_b": str, "winner": "model_a" | "model_b" | "tie" | "tie (bothbad)"}``
(other fields are ignored; ``rlhfkit judge --emit-battles`` writes this format).

Outputs in ``--output DIR``:

* ``ratings.json``: a list of ``{"model", "elo", "bt", "bt_ci_low", "bt_ci_high", "battles"}``
  sorted by ``bt`` (best first);
* ``win_rates.json``: the pairwise win-rate matrix (row model's score against the column
  model, ties as half a win) and the battle counts;
* ``report.md``: the ratings table and the win-rate matrix;
* ``ratings.png``: Bradley–Terry ratings with their 95% intervals (and the online Elo);
  ``win_rates.png``: the matrix as a heat map.

The mathematics (see also ``docs/evaluation.md``):

* **Online Elo**, battles in file order: expected score
  ``E_a = 1 / (1 + 10 ** ((R_b - R_a) / 400))``, actual score ``S_a`` = 1 / 0 / 0.5,
  ``R_a += K (S_a - E_a)`` and ``R_b -= K (S_a - E_a)``; ``K = 4``, initial rating 1000.
  Elo depends on the order of the battles; with K = 4 it is a slow moving average.
* **Bradley–Terry** maximum likelihood: ``P(i beats j) = 1 / (1 + 10 ** ((r_j - r_i) / 400))``;
  a tie counts as half a win for each side. Fitted by Newton's method on the natural-log
  scale ``θ = r ln(10) / 400`` with a weak Gaussian prior ``λ/2 Σ θ²`` (``λ = 1e-3``) that
  keeps ratings finite when a model won or lost every battle and barely moves them otherwise.
  Ratings are reported as ``1000 + 400 θ / ln 10`` so the mean rating is 1000, or, with
  ``--anchor MODEL``, shifted so that model sits at ``--anchor-rating``.
* **Bootstrap**: ``--bootstrap N`` resamples of the battles with replacement (seeded), the
  BT fit redone on each; the interval is the 2.5th–97.5th percentile. A model absent from a
  resample does not contribute to that resample's percentiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlhfkit.config import arg, save_config, validated
from rlhfkit.errors import InputError, record_problem
from rlhfkit.evaluation.report import (
    cap_problems,
    fmt_num,
    fmt_pct,
    md_escape,
    md_table,
    new_figure,
    read_json_records,
    save_figure,
    write_json,
    write_text,
)

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
LN10_OVER_400 = math.log(10) / 400.0
BT_L2 = 1e-3


@dataclass
class Battle:
    model_a: str
    model_b: str
    winner: str  # one of WINNERS

    @property
    def score_a(self) -> float:
        """Model A's actual score: 1 win, 0 loss, 0.5 either kind of tie."""
        return 1.0 if self.winner == "model_a" else 0.0 if self.winner == "model_b" else 0.5


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def load_battles(path: str | Path) -> list[Battle]:
    """Read and validate a battle file; every problem names ``file:record: field``.

    Raises :class:`InputError` listing all problems (at most 50 shown).
    """
    path = Path(path)
    src = str(path)
    battles: list[Battle] = []
    problems: list[str] = []
    for rec_no, rec in read_json_records(path):
        if not isinstance(rec, dict):
            problems.append(record_problem(src, rec_no, None,
                                           f"expected an object, got {type(rec).__name__}"))
            continue
        bad = False
        for fld in ("model_a", "model_b"):
            value = rec.get(fld)
            if fld not in rec:
                problems.append(record_problem(src, rec_no, fld, "missing"))
                bad = True
            elif not isinstance(value, str) or not value.strip():
                problems.append(record_problem(src, rec_no, fld,
                                               f"expected a non-empty string, got {value!r}"))
                bad = True
        winner = rec.get("winner")
        if "winner" not in rec:
            problems.append(record_problem(src, rec_no, "winner", "missing"))
            bad = True
        elif winner not in WINNERS:
            problems.append(record_problem(src, rec_no, "winner",
                                           f"{winner!r} is not one of {', '.join(WINNERS)}"))
            bad = True
        if not bad and rec["model_a"] == rec["model_b"]:
            problems.append(record_problem(src, rec_no, "model_b",
                                           f"same model as model_a ({rec['model_a']!r})"))
            bad = True
        if not bad:
            battles.append(Battle(rec["model_a"], rec["model_b"], winner))
    if problems:
        raise InputError(cap_problems(problems))
    if not battles:
        raise InputError(f"{src}: no battles")
    return battles


# --------------------------------------------------------------------------------------------
# Ratings
# --------------------------------------------------------------------------------------------


def compute_elo(battles: Sequence[Battle], k: float = 4.0, base: float = 10.0,
                scale: float = 400.0, initial: float = 1000.0) -> dict[str, float]:
    """Online Elo over the battles in order.

    For a battle between a (rating ``R_a``) and b (``R_b``)::

        E_a = 1 / (1 + base ** ((R_b - R_a) / scale))
        R_a <- R_a + k (S_a - E_a);   R_b <- R_b - k (S_a - E_a)

    with ``S_a`` = 1 (a won), 0 (b won) or 0.5 (tie, including ``tie (bothbad)``).
    Models start at ``initial``.
    """
    ratings: dict[str, float] = {}
    for b in battles:
        ra = ratings.setdefault(b.model_a, initial)
        rb = ratings.setdefault(b.model_b, initial)
        ea = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        delta = k * (b.score_a - ea)
        ratings[b.model_a] = ra + delta
        ratings[b.model_b] = rb - delta
    return ratings


def model_index(battles: Sequence[Battle]) -> list[str]:
    """Model names in order of first appearance."""
    seen: dict[str, None] = {}
    for b in battles:
        seen.setdefault(b.model_a)
        seen.setdefault(b.model_b)
    return list(seen)


def win_counts(battles: Sequence[Battle], models: Sequence[str]) -> np.ndarray:
    """``W[i, j]`` = wins of model i over model j, a tie counting 0.5 to each side."""
    idx = {m: i for i, m in enumerate(models)}
    w = np.zeros((len(models), len(models)))
    for b in battles:
        i, j = idx[b.model_a], idx[b.model_b]
        w[i, j] += b.score_a
        w[j, i] += 1.0 - b.score_a
    return w


def fit_bradley_terry(wins: np.ndarray, l2: float = BT_L2, init: np.ndarray | None = None,
                      tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Bradley–Terry maximum likelihood from a win-count matrix, on the natural-log scale.

    Maximises, over ``θ`` (one value per model)::

        L(θ) = Σ_ij W_ij log σ(θ_i - θ_j) - λ/2 Σ_i θ_i²

    where ``W_ij`` counts i's wins over j (ties as 0.5 each) and ``σ`` is the logistic
    function. ``L`` is strictly concave for ``λ > 0``; Newton's method with backtracking
    converges in a handful of steps. The solution has ``Σ θ = 0`` (the gradient of the data
    term sums to zero), i.e. the ratings are centred. Convert with
    ``rating = 1000 + θ · 400 / ln(10)``.

    Gradient and Hessian, with ``N = W + Wᵀ`` and ``p_ij = σ(θ_i - θ_j)``::

        g_i  = Σ_j (W_ij - N_ij p_ij) - λ θ_i
        H_ij = N_ij p_ij (1 - p_ij)  (i ≠ j),   H_ii = -Σ_j N_ij p_ij (1 - p_ij) - λ
    """
    w = np.asarray(wins, dtype=float)
    n = w.shape[0]
    total = w + w.T
    theta = np.zeros(n) if init is None else np.array(init, dtype=float)

    def objective(t: np.ndarray) -> float:
        d = t[:, None] - t[None, :]
        return float(-(w * np.logaddexp(0.0, -d)).sum() - 0.5 * l2 * (t @ t))

    value = objective(theta)
    for _ in range(max_iter):
        d = theta[:, None] - theta[None, :]
        p = 1.0 / (1.0 + np.exp(-d))
        grad = (w - total * p).sum(axis=1) - l2 * theta
        c = total * p * (1.0 - p)
        hess = c.copy()
        np.fill_diagonal(hess, 0.0)
        hess[np.diag_indices(n)] = -c.sum(axis=1) + np.diag(c) - l2
        step = np.linalg.solve(hess, -grad)
        t = 1.0
        while True:
            candidate = theta + t * step
            new_value = objective(candidate)
            if new_value >= value - 1e-12 or t < 1e-8:
                break
            t *= 0.5
        theta, value = candidate, new_value
        if np.max(np.abs(t * step)) < tol:
            break
    return theta - theta.mean()


def theta_to_rating(theta: np.ndarray, center: float = 1000.0) -> np.ndarray:
    """Natural-log BT strengths -> ratings on the 400-point, base-10 scale."""
    return center + np.asarray(theta) / LN10_OVER_400


@dataclass
class ArenaResult:
    models: list[str]              # in order of first appearance
    elo: dict[str, float]
    bt: dict[str, float]
    bt_ci_low: dict[str, float]
    bt_ci_high: dict[str, float]
    battles_per_model: dict[str, int]
    wins: np.ndarray               # W[i, j], ties as 0.5, indexed like `models`
    components: list[list[str]]    # connected components of the comparison graph

    def ranking(self) -> list[str]:
        return sorted(self.models, key=lambda m: (-self.bt[m], m))

    def rows(self) -> list[dict[str, Any]]:
        return [{"model": m, "elo": round(self.elo[m], 2), "bt": round(self.bt[m], 2),
                 "bt_ci_low": _round(self.bt_ci_low[m]), "bt_ci_high": _round(self.bt_ci_high[m]),
                 "battles": self.battles_per_model[m]} for m in self.ranking()]


def _round(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 2)


def _components(models: Sequence[str], wins: np.ndarray) -> list[list[str]]:
    n = len(models)
    adj = (wins + wins.T) > 0
    seen = [False] * n
    comps = []
    for s in range(n):
        if seen[s]:
            continue
        stack, comp = [s], []
        seen[s] = True
        while stack:
            i = stack.pop()
            comp.append(models[i])
            for j in np.nonzero(adj[i])[0]:
                if not seen[j]:
                    seen[j] = True
                    stack.append(int(j))
        comps.append(comp)
    return comps


def _anchor_shift(ratings: np.ndarray, models: Sequence[str], anchor: str | None,
                  anchor_rating: float) -> float:
    if not anchor:
        return 0.0
    return anchor_rating - float(ratings[list(models).index(anchor)])


def bootstrap_bt(battles: Sequence[Battle], models: Sequence[str], rounds: int, seed: int,
                 init: np.ndarray | None = None, anchor: str | None = None,
                 anchor_rating: float = 1000.0) -> np.ndarray:
    """BT ratings on ``rounds`` resamples of the battles (``rounds × models``; NaN = absent).

    Resampling the battles with replacement is equivalent to drawing, for every distinct
    (model_a, model_b, outcome) combination, a multinomial count with probabilities equal to
    the observed frequencies, which is what is done here (fast for any number of battles).
    """
    idx = {m: i for i, m in enumerate(models)}
    keys: dict[tuple[int, int, float], int] = {}
    for b in battles:
        key = (idx[b.model_a], idx[b.model_b], b.score_a)
        keys[key] = keys.get(key, 0) + 1
    cats = list(keys)
    counts = np.array([keys[k] for k in cats], dtype=float)
    ii = np.array([k[0] for k in cats])
    jj = np.array([k[1] for k in cats])
    sa = np.array([k[2] for k in cats])
    rng = np.random.default_rng(seed)
    n_models = len(models)
    out = np.full((rounds, n_models), np.nan)
    for r in range(rounds):
        draw = rng.multinomial(len(battles), counts / counts.sum()).astype(float)
        w = np.zeros((n_models, n_models))
        np.add.at(w, (ii, jj), draw * sa)
        np.add.at(w, (jj, ii), draw * (1.0 - sa))
        present = (w + w.T).sum(axis=1) > 0
        theta = fit_bradley_terry(w, init=init)
        ratings = theta_to_rating(theta)
        if anchor and not present[idx[anchor]]:
            continue  # no reference point in this resample
        ratings = ratings + _anchor_shift(ratings, models, anchor, anchor_rating)
        ratings[~present] = np.nan
        out[r] = ratings
    return out


def rate(battles: Sequence[Battle], bootstrap: int = 200, seed: int = 0, k: float = 4.0,
         anchor: str | None = None, anchor_rating: float = 1000.0) -> ArenaResult:
    """Everything ``rlhfkit arena`` computes, as an :class:`ArenaResult`."""
    models = model_index(battles)
    if anchor and anchor not in models:
        raise InputError(f"--anchor: model {anchor!r} does not appear in the battles")
    elo = compute_elo(battles, k=k)
    wins = win_counts(battles, models)
    theta = fit_bradley_terry(wins)
    bt = theta_to_rating(theta)
    shift = _anchor_shift(bt, models, anchor, anchor_rating)
    bt = bt + shift
    if anchor:
        elo_shift = anchor_rating - elo[anchor]
        elo = {m: r + elo_shift for m, r in elo.items()}
    low = {m: float("nan") for m in models}
    high = dict(low)
    if bootstrap > 0:
        boot = bootstrap_bt(battles, models, bootstrap, seed, init=theta, anchor=anchor,
                            anchor_rating=anchor_rating)
        for i, m in enumerate(models):
            col = boot[:, i]
            col = col[np.isfinite(col)]
            if col.size:
                low[m], high[m] = (float(v) for v in np.percentile(col, [2.5, 97.5]))
    n_battles = {m: 0 for m in models}
    for b in battles:
        n_battles[b.model_a] += 1
        n_battles[b.model_b] += 1
    return ArenaResult(models=models, elo=elo, bt={m: float(bt[i]) for i, m in enumerate(models)},
                       bt_ci_low=low, bt_ci_high=high, battles_per_model=n_battles, wins=wins,
                       components=_components(models, wins))


def win_rate_matrix(result: ArenaResult, order: Sequence[str] | None = None
                    ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(models, rate, count): ``rate[i, j]`` = score of i against j (ties 0.5; NaN if none)."""
    order = list(order or result.ranking())
    idx = [result.models.index(m) for m in order]
    w = result.wins[np.ix_(idx, idx)]
    n = w + w.T
    with np.errstate(invalid="ignore", divide="ignore"):
        rate_ = np.where(n > 0, w / np.where(n > 0, n, 1), np.nan)
    return order, rate_, n


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def render_report(result: ArenaResult, source: str, n_battles: int, bootstrap: int, k: float,
                  anchor: str | None, anchor_rating: float) -> str:
    rows = result.rows()
    lines = ["# Arena ratings", "",
             f"{n_battles} battles among {len(result.models)} models from {md_escape(source)}. "
             f"Bradley–Terry ratings (400-point scale, "
             + (f"{md_escape(anchor)} fixed at {anchor_rating:g}" if anchor else "mean 1000")
             + f") with {bootstrap} bootstrap resamples for the 95% intervals; online Elo with "
             f"K={k:g} in file order.", ""]
    table = []
    for rank, r in enumerate(rows, start=1):
        ci = (f"{fmt_num(r['bt_ci_low'])} – {fmt_num(r['bt_ci_high'])}"
              if r["bt_ci_low"] is not None else "—")
        table.append([rank, md_escape(r["model"], 60), fmt_num(r["bt"]), ci, fmt_num(r["elo"]),
                      r["battles"]])
    lines.append(md_table(["#", "model", "BT", "95% CI", "Elo", "battles"], table,
                          ["r", "l", "r", "c", "r", "r"]))
    if len(result.components) > 1:
        lines += ["", "**Warning:** the models form "
                  f"{len(result.components)} groups that never met each other; ratings are "
                  "only comparable within a group: "
                  + "; ".join(", ".join(md_escape(m) for m in c) for c in result.components), ""]
    order, rates, counts = win_rate_matrix(result)
    lines += ["", "## Pairwise win rates", "",
              "Row model's score against the column model (ties count half); battle counts in "
              "parentheses.", ""]
    header = ["model"] + [md_escape(m, 24) for m in order]
    mrows = []
    for i, m in enumerate(order):
        cells = [md_escape(m, 40)]
        for j in range(len(order)):
            if i == j:
                cells.append("")
            elif counts[i, j] == 0:
                cells.append("—")
            else:
                cells.append(f"{fmt_pct(rates[i, j], 0)} ({int(round(counts[i, j]))})")
        mrows.append(cells)
    lines.append(md_table(header, mrows, ["l"] + ["c"] * len(order)))
    lines += ["", "![ratings](ratings.png)", "", "![win rates](win_rates.png)", ""]
    return "\n".join(lines)


def plot_ratings(result: ArenaResult, path: Path) -> Path:
    rows = result.rows()[::-1]  # best at the top
    names = [r["model"] for r in rows]
    bt = np.array([r["bt"] for r in rows])
    low = np.array([r["bt_ci_low"] if r["bt_ci_low"] is not None else r["bt"] for r in rows])
    high = np.array([r["bt_ci_high"] if r["bt_ci_high"] is not None else r["bt"] for r in rows])
    elo = np.array([r["elo"] for r in rows])
    fig = new_figure(7.5, max(2.5, 0.45 * len(rows) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(rows))
    ax.errorbar(bt, y, xerr=[np.maximum(bt - low, 0), np.maximum(high - bt, 0)], fmt="o",
                color="tab:blue", ecolor="tab:blue", capsize=4, label="Bradley–Terry (95% CI)")
    ax.scatter(elo, y, marker="x", color="tab:orange", label="online Elo", zorder=3)
    ax.set_yticks(y)
    ax.set_yticklabels([n if len(n) <= 40 else n[:39] + "…" for n in names])
    ax.set_xlabel("rating (400-point scale)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Arena ratings")
    return save_figure(fig, path)


def plot_win_rates(result: ArenaResult, path: Path) -> Path:
    order, rates, counts = win_rate_matrix(result)
    n = len(order)
    fig = new_figure(max(4.0, 0.7 * n + 2.5), max(3.5, 0.6 * n + 2.0))
    ax = fig.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(rates)
    im = ax.imshow(masked, vmin=0, vmax=1, cmap="RdBu")
    labels = [m if len(m) <= 20 else m[:19] + "…" for m in order]
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if np.isfinite(rates[i, j]):
                    ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="row's win rate vs column")
    ax.set_title("Pairwise win rates")
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    """Rank models from pairwise battles: online Elo and Bradley–Terry with bootstrap intervals."""

    battles: str = arg("", "Battles: a JSON list or JSONL of {\"model_a\", \"model_b\", \"winner\"} "
                       "with winner one of model_a, model_b, tie, 'tie (bothbad)' (Chatbot Arena's "
                       "format; `rlhfkit judge --emit-battles` writes it).")
    output: str = arg("", "Output directory: ratings.json, win_rates.json, report.md, ratings.png, "
                      "win_rates.png.")
    bootstrap: int = arg(200, "Bootstrap resamples of the battles for the 95 percent intervals (0: none).")
    seed: int = arg(0, "Random seed for the bootstrap.")
    elo_k: float = arg(4.0, "Elo K-factor (rating points moved per unit of surprise).")
    anchor: str = arg("", "Model whose Bradley–Terry and Elo ratings are fixed at --anchor-rating "
                      "(default: ratings are centred so their mean is 1000).")
    anchor_rating: float = arg(1000.0, "Rating given to --anchor.")
    plot: bool = arg(True, "Write ratings.png and win_rates.png.")

    def validate(self) -> list[str]:
        problems = []
        if not self.battles:
            problems.append("--battles is required")
        elif not Path(self.battles).is_file():
            problems.append(f"--battles: no such file: {self.battles}")
        if not self.output:
            problems.append("--output is required")
        if self.bootstrap < 0:
            problems.append(f"--bootstrap must be >= 0 (got {self.bootstrap})")
        if self.elo_k <= 0:
            problems.append(f"--elo-k must be > 0 (got {self.elo_k})")
        return problems


def main(cfg: Config) -> int:
    battles = load_battles(validated(cfg).battles)
    result = rate(battles, bootstrap=cfg.bootstrap, seed=cfg.seed, k=cfg.elo_k,
                  anchor=cfg.anchor or None, anchor_rating=cfg.anchor_rating)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    rows = result.rows()
    write_json(out / "ratings.json", rows)
    order, rates, counts = win_rate_matrix(result)
    write_json(out / "win_rates.json", {"models": order, "win_rate": rates, "battles": counts})
    write_text(out / "report.md", render_report(result, cfg.battles, len(battles), cfg.bootstrap,
                                                cfg.elo_k, cfg.anchor or None, cfg.anchor_rating))
    if cfg.plot:
        plot_ratings(result, out / "ratings.png")
        plot_win_rates(result, out / "win_rates.png")
    width = max(len(r["model"]) for r in rows)
    print(f"{len(battles)} battles, {len(rows)} models -> {out}")
    for r in rows:
        ci = (f"[{r['bt_ci_low']:.1f}, {r['bt_ci_high']:.1f}]" if r["bt_ci_low"] is not None else "")
        print(f"  {r['model']:<{width}}  BT {r['bt']:7.1f} {ci:>18}  Elo {r['elo']:7.1f}  "
              f"({r['battles']} battles)")
    if len(result.components) > 1:
        print(f"warning: {len(result.components)} disconnected groups of models; ratings are "
              "comparable only within a group (see report.md)")
    return 0
