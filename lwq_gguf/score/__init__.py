"""The score stage (floor 2 in docs/design.md): layer scores (LIM, ZD), the Fisher pass, the per-
tensor sensitivity tables, the importance matrix, and the score cache."""
