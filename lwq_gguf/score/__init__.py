"""Stage 2 - score: layer scores (LIM, ZD), the Fisher pass, the per-tensor sensitivity tables,
the importance matrix, and the score cache."""
