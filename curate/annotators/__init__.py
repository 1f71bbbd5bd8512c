"""Annotators: one module per score family, each registered with ``@register_annotator``."""
