"""Recipe search over the evaluation stage: evolutionary search (CMA-ES) and greedy soups."""
