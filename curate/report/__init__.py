"""What a run tells its user: ``report.*`` (build, data, plots, render) and ``curate inspect``."""
