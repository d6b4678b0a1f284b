"""The plan stage (floor 2 in docs/design.md): one quantization type for every tensor within the
bit budget (the paper's layer ranking, or the least-expected-KLD knapsack)."""
