"""Evaluation: multiple-choice harness for C-Eval and same-shaped sets (``eval.c_eval``)."""
