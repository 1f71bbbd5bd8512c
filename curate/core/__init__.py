"""The ground every other package stands on: typed config and recipes, the operator and
stage bases, registries, the ledger schema, the run folder (marker, lock, layout), progress."""
