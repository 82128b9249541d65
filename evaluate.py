"""Metrics for emotion and sentiment predictions.

    from evaluate import classification_metrics
    m = classification_metrics(y_true, y_pred, data.EMOTIONS)
    m["weighted_f1"], m["per_class"]["joy"]["f1"], m["confusion"]

train.py uses `classification_metrics` for dev (every epoch) and test (at the end).
"""

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(y_true, y_pred, class_names):
    """Accuracy, macro F1, weighted F1, per-class precision/recall/F1/support and the confusion
    matrix (rows: true class, columns: predicted), over every class in class_names, including
    classes that never occur in y_true or y_pred (their F1 is 0, as scikit-learn's zero_division=0).
    Plain Python numbers and lists, ready for JSON."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(class_names)},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
