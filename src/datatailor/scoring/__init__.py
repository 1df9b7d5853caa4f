"""Scoring that generation stages and evaluation runs both use: the pairwise judge (both orders), the
0–5 quality rating, and text similarity (ROUGE-L, n-grams). It sits below `stages/` and `evaluate/`:
nothing in here imports either of them."""
