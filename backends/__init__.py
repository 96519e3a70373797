"""The built-in backends of deepvis-repro (installed as ``deepvis_repro_backends``).

Each registers through the entry-point group ``deepvis_repro.backends`` exactly as a third-party
plugin would, and is configured by ``conf/backend/<name>.yaml``.
"""
