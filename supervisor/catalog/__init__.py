"""Which models exist and may run: the registry, admission to the memory budgets, the record of API loads, config reloads."""
