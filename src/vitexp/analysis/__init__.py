"""Analysis: what a model or a set of runs shows. The few-shot probe (solver, evaluator,
callback), the paper's figures (viz/: computations, drawing, images), the sweep tables,
the claims and their verdicts, report.html, the pixel baselines, the recipes study and the
model card.

Nothing is imported here: each command loads only the modules it uses.
"""
