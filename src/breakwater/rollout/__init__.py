"""Model versions and rollouts: aliases with weighted splits, their store, and the rollback guard."""
