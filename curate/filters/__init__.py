"""Filter implementations: one module per filter, each registered with ``@register_filter``.

Adding a module here is enough for filter sets (``filters/*.yaml``) to name it.
"""
