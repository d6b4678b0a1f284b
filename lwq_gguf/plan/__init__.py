"""Stage 3 - plan: one quantization type for every tensor within the bit budget (the paper's
layer ranking, or the least-expected-KLD knapsack)."""
