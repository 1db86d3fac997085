"""Figures every stage reports on N x 3 probabilities: the same names everywhere, so the MLflow UI compares runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = ("a", "b", "tie")
ROWS_KAGGLE_TEST = 25_000  # the competition's hidden test set: projected times are for this many rows


def speed_metrics(rows: int, seconds: float, tokens: float, startup_seconds: float) -> dict[str, float]:
    """Throughput figures under the same names in every run (engine start-up reported apart)."""
    return {"samples_per_s": rows / seconds, "tokens_per_s": tokens / seconds, "wall_seconds": seconds,
            "startup_seconds": startup_seconds, "projected_hours_25k_rows": ROWS_KAGGLE_TEST * seconds / rows / 3600}


def preference_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """log_loss (sklearn, hard labels, as Kaggle scores), accuracy, mean probability per class."""
    from sklearn.metrics import accuracy_score, log_loss

    figures = {
        "log_loss": float(log_loss(labels, probs, labels=[0, 1, 2])),
        "accuracy": float(accuracy_score(labels, probs.argmax(axis=1))),
    }
    figures.update({f"mean_p_{c}": float(probs[:, i].mean()) for i, c in enumerate(CLASSES)})
    return figures


def class_prior_log_loss(train_labels: np.ndarray, labels: np.ndarray) -> float:
    """Log-loss of always predicting the training label shares: the floor any model must beat."""
    from sklearn.metrics import log_loss

    prior = np.bincount(train_labels, minlength=3) / len(train_labels)
    return float(log_loss(labels, np.tile(prior, (len(labels), 1)), labels=[0, 1, 2]))


def length_features(rows: pd.DataFrame) -> np.ndarray:
    """Response-length features (characters and turns of A and B, their difference): no LLM needed."""
    def chars(column):
        return np.array([sum(len(t or "") for t in turns) for turns in rows[column]], dtype=float)

    a, b = np.log1p(chars("response_a")), np.log1p(chars("response_b"))
    return np.column_stack([a, b, a - b, np.abs(a - b)])


def length_baseline_probs(train: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """A logistic regression on response lengths fitted on the training split: the heuristic to beat."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=1000).fit(length_features(train), train["label"].to_numpy())
    probs = np.zeros((len(rows), 3))
    probs[:, model.classes_] = model.predict_proba(length_features(rows))
    return probs


def reference_log_losses(train: pd.DataFrame, rows: pd.DataFrame) -> dict[str, float]:
    """The two LLM-free references on `rows` (labelled): the length baseline and the class prior."""
    labels = rows["label"].to_numpy()
    return {"length_baseline_log_loss": preference_metrics(length_baseline_probs(train, rows), labels)["log_loss"],
            "class_prior_log_loss": class_prior_log_loss(train["label"].to_numpy(), labels)}


def save_plots(probs: np.ndarray, labels: np.ndarray, out_dir: Path) -> list[Path]:
    """Calibration curve per class and a confusion matrix, as PNGs the MLflow UI shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import ConfusionMatrixDisplay

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, name in enumerate(CLASSES):
        frac, mean = calibration_curve(labels == i, probs[:, i], n_bins=10, strategy="quantile")
        ax.plot(mean, frac, marker="o", label=f"P({name})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Calibration")
    ax.legend()
    calibration = out_dir / "calibration.png"
    fig.savefig(calibration, dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ConfusionMatrixDisplay.from_predictions(labels, probs.argmax(axis=1), labels=[0, 1, 2],
                                            display_labels=["A", "B", "tie"], ax=ax, colorbar=False)
    ax.set_title("Confusion matrix (argmax)")
    confusion = out_dir / "confusion_matrix.png"
    fig.savefig(confusion, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [calibration, confusion]
