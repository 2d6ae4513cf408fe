"""Honest evaluation of scored embryos (torch- and mlflow-free).

An overall ROC AUC can come from metadata the image shows (day-3 embryos are rarely labelled
good, day-5 blastocysts often are), not from judging quality. This package reports what an
embryologist needs beside it:

- `subgroups`: ROC AUC, PR AUC, balanced accuracy and calibration error overall and per value of
  each configured manifest column (`eval.subgroups`), with patient-bootstrap 95% intervals and
  the group sizes; a group with one class or too few images is listed as such.
- `shortcut`: for each of those columns, the AUC of predicting the label from the column alone
  (its per-value positive rate, fit on training rows), with a warning when the model does not
  beat it by `eval.shortcut_margin`.
- `cohort_metrics`: within-patient AUC, top-1 accuracy and Kendall tau against Gardner grades:
  how well the model chooses among one patient's embryos.
- `report`: all of it for one set of predictions (`evaluate_predictions`), as text, JSON,
  MLflow metrics (aggregates only, never a patient id), a CSV table and plots; `scores` joins a
  scores file with a manifest for `embryo-ml evaluate`.

The numerical core (`metrics`, `bootstrap`) is vectorised over bootstrap resamples: a resample
of patients is a vector of row weights (how often each row's patient was drawn), so all
resamples are evaluated as one weight matrix instead of 1000 re-indexed copies.
"""
