"""Reference figures for rlhfkit's length-controlled win rate, computed with AlpacaEval 2's own GLM pieces.

Needs a SCRATCH virtual environment with alpaca-eval 0.6.6. It is no dependency of rlhfkit: it needs
``setuptools<81``, and its ``get_length_controlled_winrate`` downloads instruction difficulties and
gamed-baseline annotations from the hub. This script calls only ``make_dmatrix_for_model`` and
``fit_LogisticRegressionCV`` (alpaca_eval/metrics/glm_winrate.py), which need nothing from the hub::

    python3 -m venv /tmp/alpaca-venv
    /tmp/alpaca-venv/bin/pip install 'setuptools<81' alpaca-eval==0.6.6
    /tmp/alpaca-venv/bin/python bench/alpaca_eval_lc_reference.py              # print the figures
    /tmp/alpaca-venv/bin/python bench/alpaca_eval_lc_reference.py --write-fixture  # regenerate the data first

The synthetic annotations (seeded, numpy only) live in ``tests/evaluation/alpaca_eval_lc_annotations.json``;
``--write-fixture`` regenerates them. The printed figures are stored as numbers in
``tests/evaluation/test_winrate_alpaca_eval.py``, which checks rlhfkit's functions against them.

What AlpacaEval does, step by step (``_get_featurized_data`` then ``get_length_controlled_winrate``):
the preference is in [0, 1] with 1 = the model (``output_2``) preferred; ``std_delta_len`` is
(len(baseline) - len(model)) / its standard deviation (pandas: ddof = 1); the design matrix comes
from a patsy formula; the fit is scikit-learn's L1 ``LogisticRegressionCV`` (liblinear, no
intercept, C chosen by 5-fold GroupKFold on the log loss of the soft labels); the LC win rate is the
mean predicted preference with ``std_delta_len = 0``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "evaluation" / "alpaca_eval_lc_annotations.json"


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _one_vs_reference(rng, n, ref_len, shift, quality, length_weight, outcome):
    """Lengths of the model and the reference, and preferences drawn from a length-sensitive judge."""
    ref = np.round(ref_len(n)).clip(20)
    model = np.round(ref + shift(n)).clip(20)
    diff = model - ref
    p = _sigmoid(quality + length_weight * np.tanh(diff / diff.std()))
    return {"preference": outcome(p).tolist(), "len_model": model.tolist(), "len_ref": ref.tolist()}


def make_annotations(seed: int = 0) -> dict:
    """Three one-model sets (the minimal GLM) and one several-models set (with instruction difficulty)."""
    rng = np.random.default_rng(seed)
    hard = lambda p: (rng.random(p.size) < p).astype(float)  # noqa: E731

    def ties(p):
        u = rng.random(p.size)
        return np.where(u < 0.15, 0.5, (u < 0.15 + 0.85 * p).astype(float))

    def soft(p):  # a weighted judge: the preference is its probability, noisy
        return np.round(_sigmoid(np.log(p / (1 - p)) + rng.normal(0, 1.0, p.size)), 4)

    sets = {
        "length_only": _one_vs_reference(rng, 300, lambda n: rng.normal(800, 150, n),
                                         lambda n: np.where(rng.random(n) < 0.75, 1, -1) * rng.uniform(50, 600, n),
                                         0.2, 2.5, hard),
        "quality_with_ties": _one_vs_reference(rng, 200, lambda n: rng.normal(500, 120, n),
                                               lambda n: rng.normal(60, 250, n), 0.4, 0.6, ties),
        "soft_heavy_tail": _one_vs_reference(rng, 400, lambda n: rng.lognormal(6.3, 0.5, n),
                                             lambda n: rng.standard_t(2, n) * 150 + 100, 0.8, 1.2, soft),
    }
    return {"seed": seed, "one_model": sets, "several_models": _several_models(rng)}


def _several_models(rng, n_instructions=120):
    """A baseline and three models on the same instructions; each instruction has a difficulty."""
    difficulty = rng.normal(0, 1.0, n_instructions)
    ref = np.round(rng.normal(700, 150, n_instructions)).clip(20)
    models = {}
    for name, ability, verbosity, skill in [("m_strong", 0.8, 150, 1.0), ("m_verbose", 0.0, 450, 0.6),
                                            ("m_weak", -0.7, -50, 0.8)]:
        length = np.round(ref + rng.normal(verbosity, 200, n_instructions)).clip(20)
        diff = length - ref
        p = _sigmoid(ability - skill * difficulty + 1.5 * np.tanh(diff / diff.std()))
        models[name] = {"preference": (rng.random(n_instructions) < p).astype(float).tolist(),
                        "len_model": length.tolist()}
    return {"len_ref": ref.tolist(), "difficulty": difficulty.round(6).tolist(), "models": models}


def alpaca_eval_minimal(preference, len_model, len_ref) -> tuple[float, float]:
    """AlpacaEval's ``length_controlled_minimal`` LC win rate (0-1) and the C its cross-validation chose."""
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import GLM_INFO, fit_LogisticRegressionCV, make_dmatrix_for_model

    info = GLM_INFO["length_controlled_minimal"]
    df = pd.DataFrame({"preference": preference})
    delta = pd.Series(len_ref, dtype=float) - pd.Series(len_model, dtype=float)  # len(output_1) - len(output_2)
    df["std_delta_len"] = delta / delta.std()
    df["not_gamed_baseline"] = True
    df_test = df[["not_gamed_baseline"]].copy()
    df_test["std_delta_len"] = 0
    train, test = make_dmatrix_for_model(df, df_test, formula=info["formula"])
    model = fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, **info["kwargs"])
    return float(model.predict_proba(test)[:, 1].mean()), float(model.C_[0])


JOINT_FORMULA = ("C(generator_2):np.tanh(rand_delta_len_std_only) + C(generator_2) + C(index)"
                 " + not_gamed_baseline.astype(float) - 1")


def alpaca_eval_difficulty(several: dict) -> np.ndarray:
    """AlpacaEval's instruction difficulty: the ``C(index)`` weights of its joint GLM over every model.

    notebooks/instruction_difficulty.ipynb and notebook_helpers.make_data in tatsu-lab/alpaca_eval: a
    per-model bias, a per-model slope on tanh(length difference / that model's std), one weight per
    instruction (treatment coding: the first instruction is 0), fitted with ``fit_LogisticRegressionCV``.
    (make_data adds uniform noise of 1e-4 characters to the length differences, unseeded; left out.)
    """
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import fit_LogisticRegressionCV, make_dmatrix_for_model

    ref = np.asarray(several["len_ref"], dtype=float)
    frames = []
    for name, m in several["models"].items():
        delta = pd.Series(ref - np.asarray(m["len_model"], dtype=float))
        frames.append(pd.DataFrame({"preference": m["preference"], "index": np.arange(ref.size),
                                    "generator_2": name, "rand_delta_len_std_only": delta / delta.std(),
                                    "not_gamed_baseline": True}))
    df = pd.concat(frames, ignore_index=True)
    train, _ = make_dmatrix_for_model(df, df, formula=JOINT_FORMULA)
    model = fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, n_splits=5)
    weights = dict(zip(train.drop(columns=["preference"]).columns, model.coef_[0]))
    return np.array([weights.get(f"C(index)[T.{i}]", 0.0) for i in range(ref.size)]), float(model.C_[0])


def alpaca_eval_with_difficulty(preference, len_model, len_ref, difficulty) -> tuple[float, float]:
    """AlpacaEval's LC win rate with the instruction-difficulty term for a given difficulty.

    ``length_controlled_v1``'s formula without its regularisation to the gamed baselines (which needs
    AlpacaEval's own annotations of them): that is ``length_controlled_noreg``. The LC win rate is the
    mean over the instructions of the prediction at zero length difference.
    """
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import GLM_INFO, fit_LogisticRegressionCV, make_dmatrix_for_model

    info = GLM_INFO["length_controlled_noreg"]
    df = pd.DataFrame({"preference": preference, "instruction_difficulty": difficulty})
    delta = pd.Series(len_ref, dtype=float) - pd.Series(len_model, dtype=float)
    df["std_delta_len"] = delta / delta.std()
    df["not_gamed_baseline"] = True
    df_test = df[["instruction_difficulty", "not_gamed_baseline"]].copy()
    df_test["std_delta_len"] = 0
    train, test = make_dmatrix_for_model(df, df_test, formula=info["formula"])
    model = fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, **info["kwargs"])
    return float(model.predict_proba(test)[:, 1].mean()), float(model.C_[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-fixture", action="store_true", help="regenerate the synthetic annotations first")
    args = parser.parse_args()
    if args.write_fixture:
        FIXTURE.write_text(json.dumps(make_annotations(), separators=(",", ":")) + "\n")
        print(f"wrote {FIXTURE}")
    data = json.loads(FIXTURE.read_text())
    print("length_controlled_minimal (LC win rate, C chosen by AlpacaEval's cross-validation):")
    for name, s in data["one_model"].items():
        lc, c = alpaca_eval_minimal(s["preference"], s["len_model"], s["len_ref"])
        print(f"  {name}: {lc!r}  (C = {c:.4g}, n = {len(s['preference'])})")
    several = data["several_models"]
    difficulty, c_joint = alpaca_eval_difficulty(several)
    print(f"instruction difficulty from the joint GLM (C = {c_joint:.4g}): "
          f"{int(np.sum(difficulty != 0))} of {difficulty.size} non-zero, "
          f"first five {difficulty[:5].round(6).tolist()}")
    for label, d in [("the simulated difficulty", np.asarray(several["difficulty"])),
                     ("AlpacaEval's joint-GLM difficulty", difficulty)]:
        print(f"LC win rate with the instruction term, given {label}:")
        for name, m in several["models"].items():
            lc, c = alpaca_eval_with_difficulty(m["preference"], m["len_model"], several["len_ref"], d)
            print(f"  {name}: {lc!r}  (C = {c:.4g})")


if __name__ == "__main__":
    main()
